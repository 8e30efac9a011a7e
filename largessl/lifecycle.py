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

from largessl import endings
from largessl.console import err_line

PR_SET_PDEATHSIG = 1
# SLURM sends SIGTERM (or a chosen signal such as USR1) before preempting; Ctrl-C is SIGINT.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
STOP_CHECK_EVERY = 10  # steps between the collective stop checks of a training loop (and at reports, saves)
STARTUP_GRACE_S = 20.0  # a stop signal that finds a rank held ends it after this (SLURM's default KillWait, between
# its SIGTERM and SIGKILL, is 30 s; for SIGTERM in a SLURM job, half of its KillWait: StopSignals.grace_s)
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
    (a rendezvous or a collective waiting for a rank that is gone, a read of a filesystem that does not answer)
    would never act on one, and SLURM's SIGKILL, KillWait after its SIGTERM, would end it without a word. The
    signals are therefore also heard on a thread (the wakeup file descriptor), which ends a held process with one
    line (`end_stuck`) after `grace_s`:
    - in start-up, a stop signal that no stop point took (nothing new exists to save);
    - in training, a SIGTERM after which this rank made no progress (no watchdog mark: `training(progress)`). Only
      SIGTERM: SLURM kills next. The time-limit signal comes with minutes to spare, and a rank held then is the
      watchdog's (distributed.timeout_s); a long phase (a checkpoint write) is no reason to end.
    `stand_down()`: a stop point took the signal, or the job is closing; the thread acts no more."""

    def __init__(self) -> None:
        self.received = 0
        self.previous: dict[int, object] = {}
        self.moved = threading.Event()  # start-up is over: training began, or the thread stood down
        self.over = threading.Event()  # the thread acts no more
        self.progress: Callable[[], tuple[int, str, int]] | None = None  # (marks, phase, step) once training
        self.kill_wait_s: float | None = None  # SLURM's, read by the thread
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
        self.stand_down()
        signal.set_wakeup_fd(self.wakeup)
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def training(self, progress: Callable[[], tuple[int, str, int]]) -> None:
        """Start-up is over: training began; `progress()` is this rank's (marks, phase, step)."""
        self.progress = progress
        self.moved.set()

    def stand_down(self) -> None:
        """A stop point took the signal, or the job is closing: the thread ends nothing from now on."""
        self.over.set()
        self.moved.set()

    def grace_s(self, signum: int) -> float:
        """How long a held rank waits after `signum` before it ends itself: STARTUP_GRACE_S, less for SIGTERM in a
        SLURM job, half its KillWait, so the line comes before SLURM's SIGKILL."""
        if signum == signal.SIGTERM and self.kill_wait_s:
            return min(STARTUP_GRACE_S, self.kill_wait_s / 2)
        return STARTUP_GRACE_S

    def _hear(self, read: int) -> None:
        """The thread: each stop signal as it arrives, whatever the main thread is doing."""
        from largessl.launch import slurm

        self.kill_wait_s = slurm.kill_wait_s()
        while not self.over.is_set() and (data := os.read(read, 64)):
            stops = [signum for signum in data if signum in STOP_SIGNALS]
            if stops:
                self._watch(stops[0])

    def _watch(self, signum: int) -> None:
        """Whether `signum` finds this rank held: end it then (see the class)."""
        grace = self.grace_s(signum)
        if not self.moved.wait(grace):
            end_stuck(signum, f"during start-up, and no stop point came within {grace:.0f} s", "nothing new to save")
        if signum != signal.SIGTERM:
            return
        marks = -1
        while self.progress is not None and not self.over.is_set():
            now, phase, step = self.progress()
            if now == marks:
                end_stuck(signum, f"at step {step}, and no progress came within {grace:g} s (in {phase})",
                          "the newest complete checkpoint stands")
            marks = now
            self.over.wait(grace)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if not self.received:
            err_line(f"{rank_prefix()}received {signal_name(signum)}: stopping at the next stop check (every "
                     f"{STOP_CHECK_EVERY} steps while training), with a checkpoint if training has begun (Ctrl-C "
                     "again to stop at once)")
        self.received = signum


def end_stuck(signum: int, how: str, outcome: str) -> None:
    """A stop signal found this rank held (StopSignals): one line (kept in the run directory too), and the process
    ends with 128 + the signal, as a job stopped at a stop point does. On the time-limit signal rank 0 requeues a
    SLURM job and the other ranks leave REQUEUE_LEAD_S later (srun ends the step when one rank exits)."""
    from largessl.launch import slurm

    endings.say(f"{rank_prefix()}stopped by {signal_name(signum)} {how} (this rank is held: by a rank that is "
                f"gone, or a filesystem that does not answer): ending now; {outcome}")
    if signum == slurm.REQUEUE_SIGNAL:
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            slurm.requeue_on(signum, True, "it resumes from its newest complete checkpoint")
        else:
            time.sleep(REQUEUE_LEAD_S)
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
