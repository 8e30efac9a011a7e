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
import threading
import time
from collections.abc import Callable
from types import FrameType

from largessl.console import err_line

PR_SET_PDEATHSIG = 1
# SLURM sends SIGTERM (or a chosen signal such as USR1) before preempting; Ctrl-C is SIGINT.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
STOP_CHECK_EVERY = 10  # steps between the collective stop checks of a training loop (and at reports, saves)
STARTUP_GRACE_S = 20.0  # a stop signal in start-up that no stop point takes within this ends the process (SLURM's
# default KillWait, between its SIGTERM and SIGKILL, is 30 s)
REQUEUE_LEAD_S = 5.0  # how long the other ranks of a held job leave rank 0 to requeue it before they exit


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
    the next stop point agrees on it over all ranks (`Trainer`). A second Ctrl-C stops at once.

    Python runs a signal handler only when the main thread is between bytecodes, so a main thread blocked in C
    during start-up (a rendezvous or a collective waiting for a rank that is gone, a read of a filesystem that
    does not answer) would never act on one. The signals are therefore also heard on a thread (the wakeup file
    descriptor): a stop signal during start-up that no stop point has taken within STARTUP_GRACE_S ends the process
    from there (`end_stuck`). `started()` says start-up is over: a stop point took the signal, or training began
    (its stop checks and the watchdog take over)."""

    def __init__(self) -> None:
        self.received = 0
        self.previous: dict[int, object] = {}
        self.over = threading.Event()  # start-up is over: the thread no longer ends the process
        self.wakeup = -1  # the previous wakeup fd, restored on exit

    def __enter__(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._on_signal)
        read, write = os.pipe()
        os.set_blocking(write, False)
        self.wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=self._hear, args=(read,), name="largessl-stop-signals", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.over.set()
        signal.set_wakeup_fd(self.wakeup)
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def started(self) -> None:
        """Start-up is over (training began, or a stop point took the signal)."""
        self.over.set()

    def _hear(self, read: int) -> None:
        """The thread: each stop signal as it arrives, whatever the main thread is doing."""
        while not self.over.is_set() and (data := os.read(read, 64)):
            stops = [signum for signum in data if signum in STOP_SIGNALS]
            if stops and not self.over.wait(STARTUP_GRACE_S):
                end_stuck(stops[0])

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if not self.received:
            err_line(f"{rank_prefix()}received {signal_name(signum)}: stopping at the next stop check (every "
                     f"{STOP_CHECK_EVERY} steps while training), with a checkpoint if training has begun (Ctrl-C "
                     "again to stop at once)")
        self.received = signum


def end_stuck(signum: int) -> None:
    """A stop signal came during start-up and no stop point took it within STARTUP_GRACE_S: this rank is held (it
    cannot take part in one). Nothing new exists to save: rank 0 requeues a SLURM job on the time-limit signal, the
    other ranks leave REQUEUE_LEAD_S later (srun ends the step when one rank exits), and the process ends with one
    line and 128 + the signal, as a job stopped at a stop point does."""
    from largessl.launch import slurm

    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        slurm.requeue_on(signum, True, "it resumes where this job started")
    else:
        time.sleep(REQUEUE_LEAD_S)
    err_line(f"{rank_prefix()}stopped by {signal_name(signum)} during start-up, and no stop point came within "
             f"{STARTUP_GRACE_S:.0f} s (this rank is held: by a rank that is gone, or a filesystem that does not "
             "answer): ending now; nothing new to save")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


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
