"""Process lifetime: stop signals for the training loop, and processes that die with the one that started them.

A training job is a tree: the launcher (torchrun, srun or a shell), one process per rank, DataLoader workers
under each rank. No process of it may outlive its parent: an orphaned rank would keep training and writing
checkpoints into the run directory (torchrun starts every rank in a session of its own, so killing its process
group does not reach them), and an orphaned worker holds memory and the run lock. Linux's PR_SET_PDEATHSIG makes
the kernel kill a child when its parent exits, however it exits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

from largessl.console import err_line

PR_SET_PDEATHSIG = 1
# SLURM sends SIGTERM (or a chosen signal such as USR1) before preempting; Ctrl-C is SIGINT.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
STOP_CHECK_EVERY = 10  # steps between the collective stop checks of a training loop (and at reports, saves)


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Have the kernel send `signum` to this process when its parent exits (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    if parent == 1 or os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signum)


def die_with_launcher() -> None:
    """A rank started by torchrun stops when torchrun dies (SIGKILL of the launcher leaves no rank behind).
    Only under torchrun: a run started from a shell must survive that shell (nohup, tmux, a closed terminal)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent(signal.SIGKILL)


def rank_prefix() -> str:
    """'[rank N] ' in a job of several ranks (from torchrun's or srun's variables), else ''."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1)
    return f"[rank {os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0'))}] " if world > 1 else ""


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Stopped(Exception):
    """A stop signal ended the job before training began (start-up: imports, the build, resuming): nothing new to
    save. `code` is the exit code, 128 + the signal, as for a job stopped while training."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal_name(signum)} during start-up")
        self.signum = signum
        self.code = 128 + signum


class StopSignals:
    """While active, STOP_SIGNALS are recorded in `received` instead of killing the process; the previous handlers
    come back on exit. A command that trains holds it from its first line to its last (`STOPS`), so a stop in any
    phase (imports, building, resuming, a conversion, training, saving, closing) ends the job through one path:
    the next stop point agrees on it over all ranks (`Trainer`). A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.received = 0
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if not self.received:
            err_line(f"{rank_prefix()}received {signal_name(signum)}: stopping at the next stop check (every "
                     f"{STOP_CHECK_EVERY} steps while training), with a checkpoint if training has begun (Ctrl-C "
                     "again to stop at once)")
        self.received = signum


STOPS = StopSignals()  # the process's stop signals (signals are per process): entered by the commands that train


class SaveClock:
    """trainer.ckpt_every_minutes: due once that long has passed since the last checkpoint (or the start), so a
    preempted or killed job loses at most that much work, whatever the step time. 0 disables it."""

    def __init__(self, minutes: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = minutes * 60.0
        self.clock = clock
        self.last = clock()

    def due(self) -> bool:
        return self.period_s > 0 and self.clock() - self.last >= self.period_s

    def restart(self) -> None:
        """A checkpoint was just written."""
        self.last = self.clock()
