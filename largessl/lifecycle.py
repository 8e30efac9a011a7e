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

PR_SET_PDEATHSIG = 1
# SLURM sends SIGTERM (or a chosen signal such as USR1) before preempting; Ctrl-C is SIGINT.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


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


class StopSignals:
    """While active, STOP_SIGNALS call `handler` instead of killing the process; the previous handlers come back on
    exit, so nothing outlives the loop that asked for them."""

    def __init__(self, handler: Callable[[int, FrameType | None], None]) -> None:
        self.handler = handler
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()


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
