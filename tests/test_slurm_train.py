"""The shipped sbatch scripts on a real one-node SLURM cluster (tests/slurm_cluster.py): a job trains and finishes;
the time-limit signal makes it checkpoint, requeue itself and resume with the uninterrupted job's losses in one
MLflow run, again and again, also when the signal comes during start-up, with a store created by the job itself or
a server that cannot be reached; a job whose tasks are SIGKILLed and then requeued resumes from its last
checkpoint; a job with a frozen rank ends within distributed.timeout_s, naming it, and requeues itself.

The scripts themselves are submitted (no copies): sbatch options shrink them to this node (2 tasks, 1 CPU each,
no GPU) and a second `--config` after the script replaces the recipe by the debug one, shrunk further by
overrides, on gloo.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, catches, child_env, free_port, job_processes, rank_process, read_metrics
from slurm_cluster import SlurmCluster

SCRIPT = REPO / "slurm" / "pretrain_dino_vitb.sh"
SHRINK = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=15"]
DINO = ["--config", "debug/dino_vit_tiny", "model.image_size=32", "objective.local_crop_size=16",
        "objective.local_crops=2", "objective.out_dim=1024", "data.micro_batch_size=8", "optim.global_batch_size=16",
        "data.num_workers=2", "data.shuffle_buffer=50", "distributed.zero_stage=2", "trainer.max_steps=6",
        "trainer.ckpt_every=2", "trainer.log_every=1", "objective.freeze_last_layer_steps=1"]
KEYS = ("loss", "teacher_entropy", "center_norm")


def submit(cluster: SlurmCluster, workdir: Path, name: str, data: Path, *extra: str) -> str:
    """The DINO script, shrunk, as job `name` in `workdir` (its runs/, logs/ and, unless `extra` says otherwise,
    its SQLite MLflow store); `extra` overrides come last."""
    (workdir / "logs").mkdir(exist_ok=True)
    env = {**child_env(workdir), "LARGESSL_PYTHON": sys.executable}
    args = [*DINO, f"data.train={data}", f"run.name={name}", f"tracking.uri=sqlite:///{workdir}/mlflow.db",
            "tracking.experiment=slurm", *extra]
    return cluster.sbatch(SCRIPT, *args, options=[*SHRINK, f"--job-name={name}"], env=env, cwd=workdir)


def wait_for_file(path: Path, cluster: SlurmCluster, job: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        info = cluster.job_info(job)
        assert time.monotonic() < deadline and info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"{path} never appeared: {info}\n{cluster.output(job, info)}")
        time.sleep(0.1)


def after_first_checkpoint(cluster: SlurmCluster, workdir: Path, name: str, data: Path,
                           *extra: str) -> tuple[str, Path]:
    """Submit a job of the script and wait until its step-2 checkpoint is complete; (job id, run directory)."""
    run = workdir / "runs" / name
    job = submit(cluster, workdir, name, data, *extra)
    wait_for_file(run / "checkpoints" / "step_00000002" / "complete.json", cluster, job)
    return job, run


def assert_same_losses(straight: Path, run: Path, steps: range) -> None:
    """The run's losses at `steps` are exactly the uninterrupted job's (in the workdir `straight`); it logged every
    step once."""
    reference, resumed = read_metrics(straight / "runs" / "straight"), read_metrics(run)
    assert sorted(resumed) == list(range(1, 7))
    for step in steps:
        for key in KEYS:
            assert resumed[step][key] == reference[step][key], (step, key)


def resumed_at(out: str) -> int:
    """The step the job's one resume started from (at least the first checkpoint's, 2)."""
    steps = [int(line.rsplit("(step ", 1)[1].rstrip(")\n")) for line in out.splitlines()
             if line.startswith("resumed from")]
    assert len(steps) == 1 and steps[0] >= 2, out[-3000:]
    return steps[0]


def kill_tasks(marker: str) -> None:
    """SIGKILL every process whose command line holds `marker` (the job's training tasks)."""
    for pid in job_processes(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def straight(slurm_cluster: SlurmCluster, mini_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted job of the script: trains and finishes (the reference of the interrupted ones)."""
    workdir = tmp_path_factory.mktemp("slurm")
    job = submit(slurm_cluster, workdir, "straight", mini_shards)
    info = slurm_cluster.wait(job, {"COMPLETED"}, timeout=300)
    out = slurm_cluster.output(job, info)
    assert info["ExitCode"] == "0:0" and "done: 6 steps" in out, out[-3000:]
    assert "process group up: 2 rank(s) on cpu" in out  # ranks from srun's variables, no torchrun
    return workdir


def test_the_script_trains_and_finishes(straight: Path) -> None:
    assert sorted(read_metrics(straight / "runs" / "straight")) == list(range(1, 7))


def wait_for_restart(cluster: SlurmCluster, job: str, restarts: int, line: str, timeout: float = 120) -> str:
    """Wait until the job runs for the `restarts`-th time and its log holds `line` that often; the log."""
    deadline = time.monotonic() + timeout
    while True:
        info = cluster.wait(job, {"RUNNING"}, timeout=max(1.0, deadline - time.monotonic()))
        out = cluster.output(job, info)
        if info["Restarts"] == str(restarts) and out.count(line) > restarts:
            return out
        assert time.monotonic() < deadline, f"restart {restarts} never showed {line!r}: {info}\n{out[-3000:]}"
        time.sleep(0.05)


def wait_for_handlers(marker: str, signum: int, timeout: float = 60) -> None:
    """Until both ranks of the job catch `signum` (from their first lines of Python on)."""
    deadline = time.monotonic() + timeout
    while not all((pid := rank_process(marker, rank)) and catches(pid, signum) for rank in (0, 1)):
        assert time.monotonic() < deadline, f"the ranks of {marker} never caught signal {signum}"
        time.sleep(0.02)


def test_time_limit_requeue_repeats_also_in_start_up_with_a_store_the_job_creates(
        slurm_cluster: SlurmCluster, straight: Path, mini_shards: Path, tmp_path: Path) -> None:
    """The time-limit signal while training, then again while the requeued job starts (its stop points), with
    DataLoader workers and a SQLite store that the first job creates: requeued twice, then it finishes with the
    uninterrupted job's losses, each step once, in one MLflow run."""
    job, run = after_first_checkpoint(slurm_cluster, tmp_path, "requeued", mini_shards)
    slurm_cluster.signal(job, "USR1")  # what --signal=USR1@600 sends before the time limit
    wait_for_restart(slurm_cluster, job, 1, "loading PyTorch")
    wait_for_handlers("run.name=requeued", signal.SIGUSR1)
    slurm_cluster.signal(job, "USR1")  # the requeued job is still importing, building or resuming
    info = slurm_cluster.wait(job, {"COMPLETED"}, timeout=300)
    out = slurm_cluster.output(job, info)
    assert info["Restarts"] == "2", f"{info}\n{out[-3000:]}"
    assert out.count(f"requeued SLURM job {job}") == 2 and "during start-up" in out, out[-3000:]
    assert out.count("done: 6 steps") == 1 and "Traceback" not in out, out[-3000:]
    assert_same_losses(straight, run, range(1, 7))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("slurm").experiment_id],
                              filter_string="attributes.run_name = 'requeued'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 7))  # the whole history, each step once
    # logged at the step each job resumed from, once it tracks (a job stopped early in its start-up does not)
    restarts = client.get_metric_history(runs[0].info.run_id, "slurm_restart_count")
    assert max(m.value for m in restarts) == 2.0 and all(2 <= m.step < 6 for m in restarts)
    assert runs[0].data.tags["slurm_restart_count"] == "2" and runs[0].data.tags["slurm_job_id"] == job


def test_time_limit_requeue_with_the_mlflow_server_unreachable(
        slurm_cluster: SlurmCluster, straight: Path, mini_shards: Path, tmp_path: Path) -> None:
    """Rank 0 waits for an MLflow server that never answers while the other rank has long finished its part: the
    job is requeued all the same (docs/slurm.md: training does not need the server)."""
    dead = f"tracking.uri=http://127.0.0.1:{free_port()}"
    job, run = after_first_checkpoint(slurm_cluster, tmp_path, "unreachable", mini_shards, dead,
                                      "tracking.flush_timeout_s=1")
    slurm_cluster.signal(job, "USR1")
    info = slurm_cluster.wait(job, {"COMPLETED"}, timeout=300)
    out = slurm_cluster.output(job, info)
    assert info["Restarts"] == "1" and f"requeued SLURM job {job}" in out, f"{info}\n{out[-3000:]}"
    assert_same_losses(straight, run, range(1, 7))


def test_a_frozen_rank_ends_the_job_naming_it_and_the_job_requeues(
        slurm_cluster: SlurmCluster, straight: Path, mini_shards: Path, tmp_path: Path) -> None:
    """SIGSTOP of rank 0 (which also serves the rendezvous store under srun): within distributed.timeout_s the
    other rank says that rank 0 stopped answering and requeues the job, which resumes and finishes."""
    job, run = after_first_checkpoint(slurm_cluster, tmp_path, "frozen", mini_shards, "distributed.timeout_s=8")
    frozen = rank_process("run.name=frozen", 0)
    assert frozen, "rank 0 of the job not found"
    os.kill(frozen, signal.SIGSTOP)
    started = time.monotonic()
    slurm_cluster.wait(job, {"PENDING"}, timeout=120)
    waited = time.monotonic() - started
    info = slurm_cluster.wait(job, {"COMPLETED"}, timeout=300)
    out = slurm_cluster.output(job, info)
    assert info["Restarts"] == "1" and waited < 8 + 40, f"{waited:.0f} s\n{info}\n{out[-3000:]}"
    named = [line for line in out.splitlines() if "no progress for 8 s" in line]
    assert len(named) == 1 and "[rank 1]" in named[0] and "rank 0" in named[0], out[-3000:]
    assert_same_losses(straight, run, range(resumed_at(out) + 1, 7))


def test_killed_tasks_then_requeue_resume_from_the_last_checkpoint(
        slurm_cluster: SlurmCluster, straight: Path, mini_shards: Path) -> None:
    workdir = straight
    job, run = after_first_checkpoint(slurm_cluster, workdir, "killed", mini_shards)
    kill_tasks("run.name=killed")  # as an out-of-memory kill or a node failure: nothing is saved
    slurm_cluster.wait(job, {"FAILED"}, timeout=60)
    slurm_cluster.requeue(job)
    info = slurm_cluster.wait(job, {"COMPLETED"}, timeout=300)
    out = slurm_cluster.output(job, info)
    assert info["Restarts"] == "1", info
    assert_same_losses(workdir, run, range(resumed_at(out) + 1, 7))
