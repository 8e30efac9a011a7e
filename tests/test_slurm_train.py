"""The shipped sbatch scripts on a real one-node SLURM cluster (tests/slurm_cluster.py): a job trains and finishes;
the time-limit signal makes it checkpoint, requeue itself and resume with the uninterrupted job's losses in one
MLflow run; a job whose tasks are SIGKILLed and then requeued resumes from its last checkpoint.

The scripts themselves are submitted (no copies): sbatch options shrink them to this node (2 tasks, 1 CPU each,
no GPU) and a second `--config` after the script replaces the recipe by the debug one, shrunk further by
overrides, on gloo.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, child_env, read_metrics
from slurm_cluster import SlurmCluster

SCRIPT = REPO / "slurm" / "pretrain_dino_vitb.sh"
SHRINK = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=15"]
DINO = ["--config", "debug/dino_vit_tiny", "model.image_size=32", "objective.local_crop_size=16",
        "objective.local_crops=2", "objective.out_dim=1024", "data.micro_batch_size=8", "optim.global_batch_size=16",
        "data.num_workers=0", "data.shuffle_buffer=50", "distributed.zero_stage=2", "trainer.max_steps=6",
        "trainer.ckpt_every=2", "trainer.log_every=1", "objective.freeze_last_layer_steps=1"]
KEYS = ("loss", "teacher_entropy", "center_norm")


def submit(cluster: SlurmCluster, workdir: Path, name: str, data: Path) -> str:
    (workdir / "logs").mkdir(exist_ok=True)
    env = {**child_env(workdir), "LARGESSL_PYTHON": sys.executable}
    args = [*DINO, f"data.train={data}", f"run.name={name}", f"tracking.uri=sqlite:///{workdir}/mlflow.db",
            "tracking.experiment=slurm"]
    return cluster.sbatch(SCRIPT, *args, options=[*SHRINK, f"--job-name={name}"], env=env, cwd=workdir)


def wait_for_file(path: Path, cluster: SlurmCluster, job: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        info = cluster.job_info(job)
        assert time.monotonic() < deadline and info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"{path} never appeared: {info}\n{cluster.output(job, info)}")
        time.sleep(0.1)


def after_first_checkpoint(cluster: SlurmCluster, workdir: Path, name: str, data: Path) -> tuple[str, Path]:
    """Submit a job of the script and wait until its step-2 checkpoint is complete; (job id, run directory)."""
    run = workdir / "runs" / name
    job = submit(cluster, workdir, name, data)
    wait_for_file(run / "checkpoints" / "step_00000002" / "complete.json", cluster, job)
    return job, run


def assert_same_losses(workdir: Path, run: Path, steps: range) -> None:
    """The run's losses at `steps` are exactly the uninterrupted job's; it logged every step once."""
    reference, resumed = read_metrics(workdir / "runs" / "straight"), read_metrics(run)
    assert sorted(resumed) == list(range(1, 7))
    for step in steps:
        for key in KEYS:
            assert resumed[step][key] == reference[step][key], (step, key)


def kill_tasks(marker: str) -> None:
    """SIGKILL every process whose command line holds `marker` (the job's training tasks)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue


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


def test_time_limit_signal_checkpoints_requeues_and_resumes_in_one_mlflow_run(
        slurm_cluster: SlurmCluster, straight: Path, mini_shards: Path) -> None:
    workdir = straight
    job, run = after_first_checkpoint(slurm_cluster, workdir, "requeued", mini_shards)
    slurm_cluster.signal(job, "USR1")  # what --signal=USR1@600 sends before the time limit
    info = slurm_cluster.wait(job, {"COMPLETED"}, timeout=300)
    out = slurm_cluster.output(job, info)
    assert info["Restarts"] == "1", info
    assert f"requeued SLURM job {job}" in out and "resumed from" in out, out[-3000:]
    assert out.count("done: 6 steps") == 1, out[-3000:]
    assert_same_losses(workdir, run, range(1, 7))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("slurm").experiment_id],
                              filter_string="attributes.run_name = 'requeued'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 7))  # the whole history, each step once
    restarts = client.get_metric_history(runs[0].info.run_id, "slurm_restart_count")
    assert [m.value for m in restarts] == [1.0] and 2 <= restarts[0].step < 6
    assert runs[0].data.tags["slurm_restart_count"] == "1" and runs[0].data.tags["slurm_job_id"] == job


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
    resumed_at = [int(line.rsplit("(step ", 1)[1].rstrip(")\n")) for line in out.splitlines()
                  if line.startswith("resumed from")]
    assert len(resumed_at) == 1 and resumed_at[0] >= 2, out[-3000:]
    assert_same_losses(workdir, run, range(resumed_at[0] + 1, 7))
