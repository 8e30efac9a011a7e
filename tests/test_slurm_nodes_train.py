"""The headline script across two nodes of the multi-node test cluster (tests/slurm_nodes.py): `slurm/
pretrain_cae_vith.sh`, shrunk as the one-node tests shrink the scripts (the debug recipe, CPU, gloo), with
`--nodes=2 --ntasks-per-node=2`: four ranks on two hosts with their own addresses rendezvous at the first node,
train, checkpoint into the run directory on the shared filesystem, log one MLflow run, requeue on the time-limit
signal into the same run and finish with every step logged once; with `data.order=global` the losses equal a
one-process run of the same global batch.
"""

from __future__ import annotations

import sys
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


def submit(cluster: SlurmNodes, workdir: Path, name: str, data: Path) -> str:
    """The CAE script, shrunk to two nodes of two ranks, as job `name` in `workdir` (shared by both nodes: its
    runs/, logs/ and SQLite MLflow store)."""
    (workdir / "logs").mkdir(exist_ok=True)
    env = {**child_env(workdir), "LARGESSL_PYTHON": sys.executable}
    args = [*CAE, f"data.train={data}", f"run.name={name}", f"tracking.uri=sqlite:///{workdir}/mlflow.db",
            "tracking.experiment=nodes"]
    return cluster.sbatch(SCRIPT, *args, options=[*SHRINK, f"--job-name={name}"], env=env, cwd=workdir)


def test_the_headline_script_trains_across_two_nodes_requeues_and_matches_one_process(
        slurm_nodes: SlurmNodes, mini_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "nodes"
    job = submit(slurm_nodes, tmp_path, "nodes", mini_shards)
    wait_for_file(run / "checkpoints" / "step_00000002" / "complete.json", slurm_nodes, job)
    slurm_nodes.signal(job, "USR1")  # what --signal=USR1@600 sends before the time limit
    info = slurm_nodes.wait(job, {"COMPLETED"}, timeout=600)
    out = slurm_nodes.output(job, info)
    assert info["Restarts"] == "1" and info["NodeList"] == "lss[1-2]", f"{info}\n{out[-3000:]}"
    assert out.count("process group up: 4 rank(s) on cpu") == 2 and out.count(f"requeued SLURM job {job}") == 1
    assert out.count("done: 6 steps") == 1 and "resumed from" in out and "Traceback" not in out, out[-3000:]
    metrics = read_metrics(run)
    assert sorted(metrics) == list(range(1, 7))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (logged,) = client.search_runs([client.get_experiment_by_name("nodes").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(logged.info.run_id, "loss")) == list(range(1, 7))

    reference = run_largessl(["pretrain", *CAE, f"data.train={mini_shards}", "run.name=one",
                              "tracking.enabled=false"], tmp_path)  # one process, 4 micro-batches per step
    assert reference.returncode == 0, reference.stdout[-2000:] + reference.stderr[-2000:]
    one = read_metrics(tmp_path / "runs" / "one")
    for step in range(1, 7):
        assert metrics[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-4), step
