"""A rank that stops answering must not hold the job: every rank watches its own progress and, after
distributed.timeout_s without any, ends with one line naming the rank that went silent.

The training thread marks each phase it enters (`mark`: reading data, forward/backward, optimizer step, EMA update,
a stop check, a checkpoint write, an evaluation batch, each start-up phase); every rank goes through the same
marks in the same order, so a rank's count of marks says how far it got. A watchdog thread per rank publishes
that position, with a beat counter, to the job's rendezvous store (the TCP store every rank already reaches:
torchrun's agent, or rank 0's process under srun) every `beat_s` seconds. When the current phase of a rank has
lasted longer than the timeout, its watchdog reads every rank's position twice, a few beats apart:

- a rank whose beat did not move is frozen or gone (SIGSTOP, a dead node, a process holding the interpreter);
- else the rank(s) with the fewest marks are stuck where they are (a read on a dead filesystem) and the others
  wait for them in a collective;
- else every rank waits in the same collective (a hung collective or kernel);
- a store that does not answer means its host is frozen: rank 0 under srun.

It then prints that in one line, asks SLURM to requeue the job (once: the lowest rank that still answers), and
ends the process (exit 1); the silent rank goes with the job (srun's --kill-on-bad-exit, or torchrun). The
backend's own collective timeout is set a minute above distributed.timeout_s, as a backstop.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from largessl import endings, faults
from largessl.lifecycle import rank_prefix
from largessl.threads import bounded

KEY = "largessl/beat/{rank}"
STORE_WAIT_S = 5.0  # for one read or write of the rendezvous store
EXIT_CODE = 1  # like a rank that lost contact with a failed peer (design.md "Failure")


class Watchdog:
    """This rank's progress (`mark`) and the thread that publishes it and ends the job when it stalls."""

    def __init__(self, timeout_s: float, rank: int, world_size: int, store: Callable[[float], Any] | None,
                 on_hang: Callable[[list[int]], None], beat_s: float = 0.0) -> None:
        """`store(timeout_s)` opens a client of the rendezvous store (None: one rank, no peers to ask);
        `on_hang(silent ranks)` runs on the watchdog thread after the line is printed (requeue, exit). A beat
        every `beat_s` seconds (0: a fifth of the timeout, within 0.5-30 s)."""
        self.timeout_s, self.rank, self.world_size = timeout_s, rank, world_size
        self.beat_s = beat_s or min(30.0, max(0.5, timeout_s / 5))
        self.open_store, self.on_hang = store, on_hang
        self.phase, self.step, self.marks, self.since = "start-up", 0, 0, time.monotonic()
        self.host = socket.gethostname()
        self._stopped = threading.Event()

    def mark(self, phase: str, step: int | None = None) -> None:
        """The training thread enters `phase` (of `step`): the clock of the timeout starts again."""
        self.phase, self.marks, self.since = phase, self.marks + 1, time.monotonic()
        if step is not None:
            self.step = step

    def start(self) -> None:
        threading.Thread(target=self._run, name="largessl-watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def position(self, beat: int) -> dict[str, Any]:
        return {"beat": beat, "marks": self.marks, "step": self.step, "phase": self.phase,
                "in_phase_s": round(time.monotonic() - self.since, 1), "host": self.host, "pid": os.getpid()}

    # ------------------------------------------------------------------ the watchdog thread

    def _run(self) -> None:
        store = self._connect()
        beat = 0
        while not self._stopped.wait(self.beat_s):
            beat += 1
            _publish(store, self.rank, self.position(beat))
            if time.monotonic() - self.since > self.timeout_s and not self._stopped.is_set():
                self._end(store, beat)
                return

    def _connect(self) -> Any:
        if self.open_store is None or self.world_size == 1:
            return None
        store = _store_call(lambda: self.open_store(STORE_WAIT_S), 2 * STORE_WAIT_S)
        _publish(store, self.rank, self.position(0))
        return store

    def _end(self, store: Any, beat: int) -> None:
        why, silent = self.judge(store, beat)
        line = (f"largessl: error: {rank_prefix()}no progress for {self.timeout_s:g} s "
                f"(distributed.timeout_s) in {self.phase} at step {self.step}: {why}; ending the job")
        endings.say(line)
        self.on_hang(silent)

    def judge(self, store: Any, beat: int) -> tuple[str, list[int]]:
        """Which rank the job waits for, in words, and the ranks that stopped answering."""
        if self.world_size == 1:
            return "this process is stuck there", []
        first = _read_all(store, self.world_size)
        if first is not None:
            time.sleep(2 * self.beat_s)  # every live rank beats at least once meanwhile
            _publish(store, self.rank, self.position(beat + 1))
        second = _read_all(store, self.world_size) if first is not None else None
        if first is None or second is None:
            host = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            return (f"the rendezvous store at {host} does not answer (rank 0 serves it under srun, torchrun's agent "
                    "under torchrun): rank 0 or its node is frozen or gone", [0])
        silent = [r for r in range(self.world_size) if r != self.rank and _still(first, second, r)]
        if silent:
            return "; ".join(_silent_words(r, first.get(r) or second.get(r)) for r in silent), silent
        return _laggards(second, self.rank), []


def _still(first: dict[int, dict], second: dict[int, dict], rank: int) -> bool:
    """Whether `rank` did not beat between the two readings (or never published)."""
    later = second.get(rank)
    return later is None or (first.get(rank) or {}).get("beat") == later["beat"]


def _silent_words(rank: int, seen: dict[str, Any] | None) -> str:
    if not seen:
        return f"rank {rank} never reported (stuck in start-up, or gone)"
    return (f"rank {rank} (host {seen['host']}, pid {seen['pid']}) has stopped answering: frozen or gone, last seen in "
            f"{seen['phase']} at step {seen['step']}")


def _laggards(positions: dict[int, dict], me: int) -> str:
    fewest = min(p["marks"] for p in positions.values())
    behind = sorted(r for r, p in positions.items() if p["marks"] == fewest)
    where = positions[behind[0]]
    if len(behind) == len(positions):
        return (f"every rank has waited in {where['phase']} at step {where['step']}: a collective or kernel that "
                "never returns")
    names = ", ".join(f"rank {r}{' (this rank)' if r == me else ''} (host {positions[r]['host']}, pid "
                      f"{positions[r]['pid']})" for r in behind)
    return (f"{names} stuck in {where['phase']} at step {where['step']} for {where['in_phase_s']:g} s; the other "
            "ranks wait for it")


def _publish(store: Any, rank: int, position: dict[str, Any]) -> None:
    if store is not None:
        _store_call(lambda: store.set(KEY.format(rank=rank), json.dumps(position)))


def _read_all(store: Any, world_size: int) -> dict[int, dict] | None:
    """Every rank's last published position (a rank that never published is absent); None when the store does not
    answer."""
    if store is None:
        return None

    def read() -> dict[int, dict]:
        keys = {rank: KEY.format(rank=rank) for rank in range(world_size)}
        return {rank: json.loads(store.get(key)) for rank, key in keys.items() if store.check([key])}

    return _store_call(read)


def _store_call(action: Callable[[], Any], timeout: float = STORE_WAIT_S) -> Any:
    """What `action` returned, or None when it failed or had not returned within `timeout` s (the store's host is
    frozen: its requests never get a reply)."""
    return bounded(action, timeout, "largessl-watchdog-store")[1]


# ----------------------------------------------------------------------------- the process's watchdog

_current: Watchdog | None = None
_progress = (0, "start-up", 0)  # this process's (marks, phase, step), with or without a watchdog


def mark(phase: str, step: int | None = None) -> None:
    """Mark a phase on this process's watchdog (nothing when none runs: tests, bench, a single evaluation)."""
    global _progress
    faults.reached(phase, step)
    _progress = (_progress[0] + 1, phase, _progress[2] if step is None else step)
    if _current is not None:
        _current.mark(phase, step)


def progress() -> tuple[int, str, int]:
    """(marks so far, the current phase, its step): how far this process got (lifecycle.StopSignals asks)."""
    return _progress


def watch(watchdog: Watchdog | None) -> None:
    """Make `watchdog` this process's (started), or stop the current one (None)."""
    global _current
    if _current is not None:
        _current.stop()
    _current = watchdog
    if watchdog is not None:
        watchdog.start()


def end_process(silent: list[int], rank: int, world_size: int, requeue: Callable[[str], bool]) -> None:
    """What a stalled rank does after its line: the lowest rank that still answers requeues a SLURM job, then the
    process leaves at once (its training thread is blocked; DataLoader workers die with it, the run lock is the
    kernel's and goes with it, metrics.jsonl keeps what MLflow has not received)."""
    if rank == min(set(range(world_size)) - set(silent), default=rank):
        requeue("it resumes from its newest complete checkpoint")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_CODE)
