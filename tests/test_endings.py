"""How a rank ends when it cannot stop at a stop point (lifecycle.StopSignals) and where its last line is kept
(endings.py): in training, a SIGTERM after which the rank makes no progress ends it with one line half of SLURM's
KillWait later, before SLURM's SIGKILL would end it without a word; a rank that still makes progress, a time-limit
signal, or a job already closing is left to its stop check, the watchdog or SLURM. Each rank's line is appended to
RUN_DIR/ends/rank_N.log, which every node can read.

Each case runs in a child process (the thread ends its process), with SLURM's KillWait given as 4 s. The
multi-node tests (test_slurm_nodes_train.py) hold ranks in real collectives across a lost node and a network cut.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import child_env

from largessl import endings

KILL_WAIT_S = 4.0
GRACE_S = KILL_WAIT_S / 2
CHILD = """
import select, sys, time
from pathlib import Path
from largessl import endings, watchdog
from largessl.launch import slurm
from largessl.lifecycle import STOPS

slurm.kill_wait_s = lambda: {kill_wait}
how, run = sys.argv[1], Path(sys.argv[2])
endings.keep_in(run, 3)
with STOPS:
    STOPS.training(watchdog.progress)
    watchdog.mark("forward/backward", 7)
    if how == "closing":
        STOPS.stand_down()
    while STOPS.kill_wait_s is None:  # the thread has read KillWait
        time.sleep(0.01)
    print("ready", flush=True)
    until = time.monotonic() + {lasts}
    while time.monotonic() < until:
        if how == "progressing":
            watchdog.mark("reading data")
            time.sleep(0.2)
        else:
            select.select([], [], [], until - time.monotonic())  # blocked, as in a collective
    print("lasted", flush=True)
"""
LASTS_S = 3 * GRACE_S + 2


def run_child(how: str, signum: int, run: Path) -> tuple[int, float, str, str]:
    """(exit code, seconds from the signal to the end, stdout, stderr) of a child that trains `how` (held,
    progressing, closing) and gets `signum`."""
    code = CHILD.format(kill_wait=KILL_WAIT_S, lasts=LASTS_S)
    env = {**child_env(run), "RANK": "3", "WORLD_SIZE": "4"}
    child = subprocess.Popen([sys.executable, "-c", code, how, str(run)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "ready\n", child.communicate()
    child.send_signal(signum)
    sent = time.monotonic()
    out, err = child.communicate(timeout=60)
    return child.returncode, time.monotonic() - sent, out, err


def test_a_rank_held_in_training_ends_on_sigterm_before_slurm_kills_it_and_keeps_its_line(tmp_path: Path) -> None:
    code, took, out, err = run_child("held", signal.SIGTERM, tmp_path)
    line = ("[rank 3] stopped by SIGTERM at step 7, and no progress came within 2 s (in forward/backward) (this "
            "rank is held: by a rank that is gone, or a filesystem that does not answer): ending now; the newest "
            "complete checkpoint stands")
    assert code == 128 + signal.SIGTERM and "lasted" not in out, err
    assert GRACE_S <= took < KILL_WAIT_S, took  # within SLURM's KillWait
    assert err.splitlines()[-1] == line, err
    (kept,) = (tmp_path / "ends" / "rank_3.log").read_text().splitlines()
    assert kept.endswith(f": {line}") and " host " in kept and " pid " in kept, kept


@pytest.mark.parametrize(("how", "signum"), [
    ("progressing", signal.SIGTERM),  # its stop check comes: it stops there, with a checkpoint
    ("held", signal.SIGUSR1),  # the time-limit signal leaves minutes: a held rank is the watchdog's
    ("closing", signal.SIGTERM),  # the job is closing (MLflow's flush): SLURM's KillWait is its time
])
def test_a_rank_that_is_not_held_or_not_killed_next_is_not_ended(how: str, signum: int, tmp_path: Path) -> None:
    code, took, out, err = run_child(how, signum, tmp_path)
    assert code == 0 and "lasted" in out and "ending now" not in err, err
    assert took >= LASTS_S - 2 * GRACE_S  # it lasted past the grace, twice over
    assert not (tmp_path / "ends").exists()


def test_an_ending_line_is_appended_with_time_host_pid_and_the_slurm_attempt(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.setattr(endings, "_target", None)
    endings.keep("before the run directory")  # not kept: nowhere yet
    endings.keep_in(tmp_path, 5)
    endings.keep("first")
    endings.keep("second")
    first, second = (tmp_path / "ends" / "rank_5.log").read_text().splitlines()
    assert " job 41.2 host " in first and first.endswith(": first") and second.endswith(": second")
    stamp = datetime.strptime(first.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    assert abs(stamp - time.time()) < 5


def test_a_run_directory_that_cannot_take_the_line_is_passed_over(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ends").write_text("a file where the folder should be")
    monkeypatch.setattr(endings, "_target", None)
    endings.keep_in(tmp_path, 0)
    started = time.monotonic()
    endings.keep("the line")  # no exception: stderr has the line
    assert time.monotonic() - started < endings.WRITE_WAIT_S
