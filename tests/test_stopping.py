"""How a job ends before its last step (largessl/stopping.py, watchdog.py), through the real command: a stop signal
in any start-up phase ends every rank at one stop point, with nothing saved and nothing left behind, and the rerun
trains; a rank that stops answering is named by the others within distributed.timeout_s; the watchdog's judgement
over a real rendezvous store (a rank behind, a silent rank, a store that does not answer).

The SLURM side (requeue before any rank exits, also in start-up; a frozen rank requeues the job) is in
test_slurm_train.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import free_port, rank_process, read_metrics, run_largessl
from test_failures import args, assert_none_left, finish, start, wait_for_line

from largessl.watchdog import Watchdog

SMALL = ["model.image_size=32", "data.micro_batch_size=8", "optim.global_batch_size=16", "trainer.log_every=1"]


@pytest.mark.parametrize(("signum", "after"), [
    (signal.SIGTERM, "loading PyTorch"),  # the imports
    (signal.SIGUSR1, "process group up"),  # the run directory, the model build
    (signal.SIGINT, "DeepSpeed engine:"),  # the teacher, resuming, the data loader
])
def test_a_stop_signal_in_start_up_ends_the_job_cleanly_and_the_rerun_trains(
        signum: signal.Signals, after: str, mini_shards: Path, tmp_path: Path) -> None:
    name = f"early-{signum.name}"
    command = args(mini_shards, name, *SMALL, "trainer.max_steps=3")
    job = start(command, tmp_path)
    wait_for_line(job, after)
    job.send_signal(signum)
    code, out, err = finish(job)
    assert code == 128 + signum, f"{code}\n{out[-2000:]}\n{err[-2000:]}"
    assert f"stopped by {signum.name} during start-up" in out and "Traceback" not in err, f"{out[-2000:]}\n{err}"
    assert not list((tmp_path / "runs" / name / "checkpoints").glob("step_*")), "nothing was trained to save"
    assert_none_left(f"run.name={name}")
    rerun = run_largessl(command, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(read_metrics(tmp_path / "runs" / name)) == [1, 2, 3]


def test_a_stop_signal_to_one_rank_in_start_up_stops_both(mini_shards: Path, tmp_path: Path) -> None:
    job = start(args(mini_shards, "early-one", *SMALL, "trainer.max_steps=3"), tmp_path, nproc=2)
    wait_for_line(job, "process group up")
    rank1 = rank_process("run.name=early-one", 1)
    assert rank1, "rank 1 not found"
    os.kill(rank1, signal.SIGUSR1)
    code, out, err = finish(job)
    assert code != 0 and "stopped by SIGUSR1 during start-up" in out, f"{code}\n{out[-2000:]}\n{err[-3000:]}"
    # torchrun prints its own traceback when a child fails; no frame of ours may be in it
    assert "exitcode  : 138" in err and not re.search(r'File ".*/largessl/', err), err[-3000:]
    assert_none_left("run.name=early-one")


def test_a_frozen_rank_is_named_by_the_other_within_the_timeout(mini_shards: Path, tmp_path: Path) -> None:
    job = start(args(mini_shards, "frozen", *SMALL, "trainer.max_steps=500", "distributed.timeout_s=5"), tmp_path,
                nproc=2)
    wait_for_line(job, r"^step 3/")
    frozen = rank_process("run.name=frozen", 1)
    assert frozen, "rank 1 not found"
    os.kill(frozen, signal.SIGSTOP)
    stopped = time.monotonic()
    lines = []
    for line in job.stderr:
        lines.append(line)
        if "no progress for 5 s" in line:
            break
    waited = time.monotonic() - stopped
    os.kill(frozen, signal.SIGCONT)  # torchrun would SIGKILL it 30 s later; this is quicker
    code, out, err = finish(job)
    line = lines[-1] if lines else ""
    assert "[rank 0] no progress for 5 s" in line and "rank 1 (host" in line and "stopped answering" in line, (
        "".join(lines)[-3000:] + err[-2000:])
    assert 5 <= waited < 5 + 20 and code != 0, waited
    assert_none_left("run.name=frozen")


# ----------------------------------------------------------------------------- the judgement, over a real store


def positions(port: int, marks: dict[int, int], silent: int | None = None) -> list[Watchdog]:
    """Watchdogs of ranks 0-2 on the store at `port`, beating every 0.2 s; rank r has marked `marks[r]` phases,
    the last one 'reading data' for the rank with the fewest; `silent` stops beating after its first beats."""
    def client(timeout_s: float) -> dist.TCPStore:
        return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=timeout_s))

    dogs = []
    for rank, count in marks.items():
        dog = Watchdog(3600, rank, len(marks), client, on_hang=lambda silent: None, beat_s=0.2)
        for index in range(count):
            dog.mark("reading data" if index == count - 1 and count == min(marks.values()) else "forward/backward",
                     step=41)
        dog.start()
        dogs.append(dog)
    time.sleep(0.6)
    if silent is not None:
        dogs[silent].stop()  # as SIGSTOP would: its last position stays in the store, and no beat follows
    return dogs


@pytest.fixture
def store_port() -> int:
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    yield port
    del store


def test_the_rank_furthest_behind_is_named(store_port: int) -> None:
    dogs = positions(store_port, {0: 10, 1: 7, 2: 10})
    why, silent = dogs[0].judge(dogs[0]._connect(), 100)
    where = f"rank 1 (host {socket.gethostname()}, pid {os.getpid()}) stuck in reading data at step 41"
    assert silent == [] and where in why, why
    why, silent = dogs[1].judge(dogs[1]._connect(), 100)  # the stuck rank's own watchdog says so too
    assert "rank 1 (this rank)" in why
    for dog in dogs:
        dog.stop()


def test_a_rank_that_does_not_beat_is_named_silent(store_port: int) -> None:
    dogs = positions(store_port, {0: 10, 1: 10, 2: 10}, silent=2)
    why, silent = dogs[0].judge(dogs[0]._connect(), 100)
    assert silent == [2] and why.startswith("rank 2 ") and "has stopped answering" in why
    dogs[0].stop(), dogs[1].stop()


def test_every_rank_in_the_same_place_is_a_hung_collective(store_port: int) -> None:
    dogs = positions(store_port, {0: 10, 1: 10})
    why, silent = dogs[1].judge(dogs[1]._connect(), 100)
    assert silent == [] and why.startswith("every rank has waited in reading data at step 41")
    for dog in dogs:
        dog.stop()


def test_a_store_that_never_answers_names_rank_0_within_seconds() -> None:
    with socket.socket() as frozen:  # accepts connections and never replies, as a SIGSTOPped store host
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(8)
        port = frozen.getsockname()[1]
        dog = Watchdog(3600, 1, 2, lambda timeout_s: dist.TCPStore("127.0.0.1", port, is_master=False,
                                                                   timeout=timedelta(seconds=timeout_s)),
                       on_hang=lambda silent: None, beat_s=0.2)
        started = time.monotonic()
        why, silent = dog.judge(dog._connect(), 1)
    assert silent == [0] and "rendezvous store at" in why and "rank 0" in why
    assert time.monotonic() - started < 30


def state(pid: int) -> str:
    """The process's state letter (R, S, T for stopped...), '' when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return ""


def test_a_rank_held_in_start_up_ends_on_a_stop_signal_within_the_grace(mini_shards: Path, tmp_path: Path) -> None:
    """Rank 0 freezes at its first start-up stop point (a fault: SIGSTOP), so rank 1 waits in that stop point's
    collective, its main thread blocked in C where no Python signal handler runs. SIGTERM to rank 1 still ends it,
    STARTUP_GRACE_S later (outside SLURM), with one line (heard on its signal thread), not at the launcher's SIGKILL;
    it does not wait REQUEUE_LEAD_S for a requeue, which only the time-limit signal asks for."""
    import subprocess
    import sys

    from conftest import child_env

    from largessl.lifecycle import STARTUP_GRACE_S

    marker = "run.name=held"
    env = {**child_env(tmp_path), "LARGESSL_FAULT": "rank=0 step=0 phase=start-up: run directory signal=SIGSTOP"}
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(free_port()), "-m", "largessl", *args(mini_shards, "held", *SMALL)], cwd=tmp_path,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_line(job, "process group up")
        deadline = time.monotonic() + 60
        while not ((rank0 := rank_process(marker, 0)) and state(rank0) == "T"):
            assert time.monotonic() < deadline, "rank 0 did not freeze"
            time.sleep(0.2)
        rank1 = rank_process(marker, 1)
        assert rank1, "rank 1 not found"
        time.sleep(2)  # rank 1 reaches the collective rank 0 never joins
        os.kill(rank1, signal.SIGTERM)
        sent, lines = time.monotonic(), []
        for line in job.stderr:
            lines.append(line)
            if "no stop point came within" in line:
                break
        took = time.monotonic() - sent
        assert lines and lines[-1].strip() == (
            f"[rank 1] stopped by SIGTERM during start-up, and no stop point came within {STARTUP_GRACE_S:.0f} s "
            "(this rank is held: by a rank that is gone, or a filesystem that does not answer): ending now; "
            "nothing new to save"), "".join(lines)[-3000:]
        assert STARTUP_GRACE_S <= took < STARTUP_GRACE_S + 4  # no requeue on SIGTERM: no lead for rank 0's
        deadline = time.monotonic() + 10
        while state(rank1) not in ("", "Z"):
            assert time.monotonic() < deadline, "rank 1 still running"
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
    assert_none_left(marker)
