"""The headline script across two nodes of the multi-node test cluster (tests/slurm_nodes.py): `slurm/
pretrain_cae_vith.sh`, shrunk as the one-node tests shrink the scripts (the debug recipe, CPU, gloo), with
`--nodes=2 --ntasks-per-node=2`: four ranks on two hosts with their own addresses rendezvous at the first node,
train, checkpoint into the run directory on the shared filesystem, log one MLflow run, requeue on the time-limit
signal into the same run and finish with every step logged once; with `data.order=global` the losses equal a
one-process run of the same global batch.

Slow: a node lost after a checkpoint (its slurmd and ranks SIGKILLed) ends the job within a bound, the ranks left
each with one line, and SLURM requeues it; it resumes when the node is back, or resubmitted on the node that is
left; a network cut longer than distributed.timeout_s ends every rank, on both sides of the cut, with one line within
a bound, and the job resumes after the repair; a short cut ends nothing. Each rank's line is read where every node
keeps it (RUN_DIR/ends/rank_N.log): the cut-off ranks' stderr reaches srun only over the cut link.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from conftest import REPO, child_env, read_metrics, run_largessl
from slurm_nodes import SlurmNodes
from test_slurm_train import wait_for_file

SCRIPT = REPO / "slurm" / "pretrain_cae_vith.sh"
SHRINK = ["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=15"]
CAE = ["--config", "debug/cae_vit_tiny", "data.micro_batch_size=4", "optim.global_batch_size=16",
       "data.num_workers=1", "data.shuffle_buffer=50", "data.order=global", "distributed.zero_stage=2",
       "trainer.max_steps=6", "trainer.ckpt_every=2", "trainer.log_every=1", "optim.warmup_steps=2",
       "model.drop_path_rate=0.0"]  # drop path draws per rank: the one-process reference would differ


def submit(cluster: SlurmNodes, workdir: Path, name: str, data: Path, *extra: str, shrink: list[str] = SHRINK) -> str:
    """The CAE script, shrunk to two nodes of two ranks (or `shrink`), as job `name` in `workdir` (shared by both
    nodes: its runs/, logs/ and SQLite MLflow store); `extra` overrides come last."""
    (workdir / "logs").mkdir(exist_ok=True)
    env = {**child_env(workdir), "LARGESSL_PYTHON": sys.executable}
    args = [*CAE, f"data.train={data}", f"run.name={name}", f"tracking.uri=sqlite:///{workdir}/mlflow.db",
            "tracking.experiment=nodes", *extra]
    return cluster.sbatch(SCRIPT, *args, options=[*shrink, f"--job-name={name}"], env=env, cwd=workdir)


def test_the_headline_script_trains_across_two_nodes_requeues_and_matches_one_process(
        slurm_nodes: SlurmNodes, mini_shards: Path, tmp_path: Path) -> None:
    job, run = past_first_checkpoint(slurm_nodes, tmp_path, "nodes", mini_shards)
    slurm_nodes.signal(job, "USR1")  # what --signal=USR1@600 sends before the time limit
    info = slurm_nodes.wait(job, {"COMPLETED"}, timeout=600)
    out = slurm_nodes.output(job, info)
    assert info["Restarts"] == "1" and info["NodeList"] == "lss[1-2]", f"{info}\n{out[-3000:]}"
    assert out.count("process group up: 4 rank(s) on cpu") == 2 and out.count(f"requeued SLURM job {job}") == 1
    assert out.count("done: 6 steps") == 1 and "resumed from" in out and "Traceback" not in out, out[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (logged,) = client.search_runs([client.get_experiment_by_name("nodes").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(logged.info.run_id, "loss")) == list(range(1, 7))
    assert_like_one_process(run, mini_shards, tmp_path)  # one process, 4 micro-batches per step
    stopped, done = endings(run, job, 0), endings(run, job, 1)
    for rank in range(4):  # ranks 0-1 on the first node, 2-3 on the second; each kept how its run ended
        host = f"lss{1 + rank // 2}"
        assert [(h, line.split(";")[0]) for _, h, line in stopped[rank]] == [
            (host, f"[rank {rank}] stopped by SIGUSR1")], stopped
        assert [(h, line) for _, h, line in done[rank]] == [(host, "done: 6 steps")], done

LONGER = ["trainer.max_steps=12", "distributed.timeout_s=30"]  # steps left to lose a node in; a short timeout


def one_process(data: Path, workdir: Path, *extra: str) -> dict[int, dict]:
    """The losses of an uninterrupted one-process run of the same recipe and global batch."""
    done = run_largessl(["pretrain", *CAE, f"data.train={data}", "run.name=one", "tracking.enabled=false", *extra],
                        workdir)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return read_metrics(workdir / "runs" / "one")


def past_first_checkpoint(cluster: SlurmNodes, workdir: Path, name: str, data: Path, *extra: str) -> tuple[str, Path]:
    """Submit job `name` of the two-node script and wait for its complete step-2 checkpoint; (job id, run dir)."""
    run = workdir / "runs" / name
    job = submit(cluster, workdir, name, data, *extra)
    wait_for_file(run / "checkpoints" / "step_00000002" / "complete.json", cluster, job)
    return job, run


def assert_like_one_process(run: Path, data: Path, workdir: Path, *extra: str) -> None:
    """The run logged each of steps 1..max_steps once (a step a failed job logged after its checkpoint was done
    again: the later value stands), with the losses of one uninterrupted process."""
    metrics, one = read_metrics(run), one_process(data, workdir, *extra)
    assert sorted(metrics) == sorted(one)
    for step in sorted(one):
        assert metrics[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-4), step


def endings(run: Path, job: str, attempt: int) -> dict[int, list[tuple[float, str, str]]]:
    """What each rank of job `job`'s run number `attempt` (0 first, 1 after one requeue) kept as its ending in
    RUN_DIR/ends/rank_N.log: rank -> [(unix time, host, line)]."""
    kept: dict[int, list[tuple[float, str, str]]] = {}
    for path in sorted((run / "ends").glob("rank_*.log")):
        for text in path.read_text().splitlines():
            found = re.fullmatch(r"(\S+) job (\d+)\.(\d+) host (\S+) pid \d+: (.*)", text)
            assert found, text
            if (found[2], int(found[3])) == (job, attempt):
                stamp = datetime.strptime(found[1], "%Y-%m-%dT%H:%M:%S%z").timestamp()
                kept.setdefault(int(path.stem.split("_")[1]), []).append((stamp, found[4], found[5]))
    return kept


def one_line_each(kept: dict[int, list[tuple[float, str, str]]], ranks: range, since: float, bound: float) -> None:
    """Each of `ranks` ended with one line, at most `bound` s after `since` (unix time)."""
    assert sorted(kept) == list(ranks), kept
    for rank in ranks:
        ((stamp, _host, line),) = kept[rank]
        assert since - 1 <= stamp <= since + bound, (rank, stamp - since, line)


def finishes_resumed(cluster: SlurmNodes, job: str, run: Path, data: Path, workdir: Path, *extra: str) -> None:
    """The requeued job completes, resumed from a checkpoint, with one uninterrupted process's losses."""
    info = cluster.wait(job, {"COMPLETED"}, timeout=600)
    out = cluster.output(job, info)
    assert out.count("done: 12 steps") == 1 and "resumed from" in out, out[-3000:]
    assert_like_one_process(run, data, workdir, *extra)


def ended_within(cluster: SlurmNodes, job: str, bound: float) -> float:
    """Seconds until the job's ranks are gone (it is requeued: PENDING) after a failure; at most `bound`."""
    start = time.monotonic()
    info = cluster.wait(job, {"PENDING"}, timeout=bound, release=False)
    assert int(info["Restarts"]) >= 1, info
    return time.monotonic() - start


def lost_node_run(cluster: SlurmNodes, workdir: Path, data: Path) -> tuple[str, Path]:
    """A two-node job that loses node lss2 (its slurmd and ranks SIGKILLed, its link down) after its step-2
    checkpoint; returns once SLURM has requeued it, within a bound, with the link back (the node still dead)."""
    job, run = past_first_checkpoint(cluster, workdir, "lost", data, *LONGER)
    killed = time.time()
    cluster.kill_node("lss2")  # a power cut: slurmd, its steps and ranks gone, and its link
    cluster.link("lss2", up=False)
    assert ended_within(cluster, job, 120) < 120
    cluster.link("lss2", up=True)
    one_line_each(endings(run, job, 0), range(2), killed, 60)  # the ranks on lss1; lss2's died without a word
    return job, run


@pytest.mark.slow
def test_a_lost_node_ends_the_job_within_a_bound_and_it_resumes_when_the_node_is_back(
        slurm_nodes: SlurmNodes, mini_shards: Path, tmp_path: Path) -> None:
    job, run = lost_node_run(slurm_nodes, tmp_path, mini_shards)
    slurm_nodes.start_node("lss2")
    finishes_resumed(slurm_nodes, job, run, mini_shards, tmp_path, *LONGER)


@pytest.mark.slow
def test_a_job_that_lost_a_node_resumes_on_one_node_with_the_data_continuing(
        slurm_nodes: SlurmNodes, mini_shards: Path, tmp_path: Path) -> None:
    job, run = lost_node_run(slurm_nodes, tmp_path, mini_shards)
    slurm_nodes.cancel(job)
    try:
        again = submit(slurm_nodes, tmp_path, "lost", mini_shards, *LONGER,
                       shrink=["--nodes=1", "--nodelist=lss1", "--ntasks-per-node=2", "--cpus-per-task=1",
                               "--gpus-per-node=0", "--time=15"])
        info = slurm_nodes.wait(again, {"COMPLETED"}, timeout=600)
    finally:
        slurm_nodes.start_node("lss2")
    out = slurm_nodes.output(again, info)
    assert "process group up: 2 rank(s) on cpu" in out and "resumed from" in out, out[-3000:]
    assert_like_one_process(run, mini_shards, tmp_path, *LONGER)  # data.order=global: the same batches on 2 ranks


CUT = ["trainer.max_steps=12", "distributed.timeout_s=20"]


def processes_on(cluster: SlurmNodes, node: str, *words: bytes) -> list[int]:
    """The processes of `node`'s namespace whose command line holds every one of `words` (slurmstepd: a step)."""
    found = []
    for pid in cluster.pids(node):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if all(word in command for word in words):
            found.append(pid)
    return found


def ranks_on(cluster: SlurmNodes, node: str) -> list[int]:
    """The training ranks running on `node`."""
    return processes_on(cluster, node, b"largessl", b"pretrain")


def gone_within(ready: Callable[[], bool], bound: float) -> float:
    """Seconds until `ready()`; fails after `bound`."""
    start = time.monotonic()
    while not ready():
        assert time.monotonic() - start < bound, f"not within {bound} s"
        time.sleep(0.2)
    return time.monotonic() - start


def steps_gone(cluster: SlurmNodes, bound: float) -> None:
    """No job step (slurmstepd) left on any node, for 2 s in a row; fails after `bound` s."""
    def none_left() -> bool:
        return not any(processes_on(cluster, node, b"slurmstepd") for node in cluster.names)

    gone_within(lambda: none_left() and not time.sleep(2) and none_left(), bound)


@pytest.mark.slow
def test_a_network_cut_longer_than_the_timeout_ends_every_rank_in_bound_and_the_job_resumes(
        slurm_nodes: SlurmNodes, mini_shards: Path, tmp_path: Path) -> None:
    job, run = past_first_checkpoint(slurm_nodes, tmp_path, "cut", mini_shards, *CUT)
    assert ranks_on(slurm_nodes, "lss2")
    cut = time.time()
    slurm_nodes.link("lss2", up=False)
    try:
        ended_within(slurm_nodes, job, 120)  # the job: SLURM finds lss2 silent, or lss1's ranks end
        # held until the old run's processes are gone from both nodes: the requeued job reuses its id and step 0,
        # and a cleanup that comes after the relaunch (lss2's stale step once the link is back, the SIGKILL that
        # follows KillWait on lss1) would end the new run (this test releases requeued jobs after 2 s, where SLURM
        # waits its credential's lifetime)
        slurm_nodes.command("scontrol", "hold", job)
        gone_within(lambda: not ranks_on(slurm_nodes, "lss2"), 20 + 60)  # the cut-off ranks end on their own
    finally:
        slurm_nodes.link("lss2", up=True)
    slurm_nodes.wait_node("lss2")
    steps_gone(slurm_nodes, 90)
    slurm_nodes.command("scontrol", "release", job)
    assert (run / "checkpoints" / "step_00000002" / "complete.json").is_file()  # nothing before the cut is lost
    # every rank, on both sides of the cut, ended with one line (lss2's reach srun only through the cut link: they
    # are kept in the run directory) within the bound: the watchdog's timeout and its judgement, with a margin
    one_line_each(endings(run, job, 0), range(4), cut, 20 + 40)
    finishes_resumed(slurm_nodes, job, run, mini_shards, tmp_path, *CUT)


@pytest.mark.slow
def test_a_short_network_cut_that_heals_within_the_timeout_does_not_end_the_job(
        slurm_nodes: SlurmNodes, mini_shards: Path, tmp_path: Path) -> None:
    job, run = past_first_checkpoint(slurm_nodes, tmp_path, "blip", mini_shards, *CUT)
    slurm_nodes.link("lss2", up=False)
    time.sleep(4)  # shorter than distributed.timeout_s (20 s) and than SLURM's node timeout (10 s)
    slurm_nodes.link("lss2", up=True)
    info = slurm_nodes.wait(job, {"COMPLETED"}, timeout=600)
    out = slurm_nodes.output(job, info)
    assert info["Restarts"] == "0" and out.count("done: 12 steps") == 1, f"{info}\n{out[-3000:]}"
    assert sorted(read_metrics(run)) == list(range(1, 13))
