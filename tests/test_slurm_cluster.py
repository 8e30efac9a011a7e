"""The one-node SLURM test cluster (tests/slurm_cluster.py) and the sbatch scripts of slurm/, submitted as they are.

The pretrain scripts are shrunk to this node on the sbatch command line (SHRINK) and run `--print-config`, which
checks their srun line, interpreter and override passing without training; convert_in22k.sh converts and verifies
a small synset-folder tree for real.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from conftest import CLASSES, MINI_IMAGES, REPO
from slurm_cluster import KILL_WAIT, SlurmCluster

# Fits a pretrain script onto one 2-core node; --gpus-per-node=8 stays (a count-only GRES here). --time above the
# 10 minutes of --signal=USR1@600, else SLURM sends USR1 as soon as the job starts.
SHRINK = ("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=15")
PRETRAIN = {"pretrain_cae_vith.sh": "cae", "pretrain_mae_vith.sh": "mae", "pretrain_dino_vitb.sh": "dino",
            "pretrain_sim_vitb.sh": "sim"}


def job_env(workdir: Path) -> dict[str, str]:
    """A job's environment: this venv's Python for the scripts, and the checkout on PYTHONPATH."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env.update({"LARGESSL_PYTHON": sys.executable, "PYTHONPATH": str(REPO), "HOME": str(workdir)})
    return env


def test_two_tasks_run_on_the_node(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = '#!/bin/bash\nsrun bash -c \'echo "task $SLURM_PROCID of $SLURM_NTASKS on $(hostname -s)"\'\n'
    job = slurm_cluster.sbatch(script, options=["--ntasks=2", f"--output={tmp_path}/%j.out"], cwd=tmp_path)
    info = slurm_cluster.wait(job, states={"COMPLETED"}, timeout=30)
    assert info["ExitCode"] == "0:0" and info["NumTasks"] == "2"
    lines = sorted(slurm_cluster.output(job, info).splitlines())
    assert [line.split(" on ")[0] for line in lines] == ["task 0 of 2", "task 1 of 2"]


def test_requeue_restarts_the_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """`scontrol requeue` of a running job: the same job id runs again with SLURM_RESTART_COUNT=1."""
    runs = tmp_path / "runs.txt"
    script = (f'#!/bin/bash\necho "${{SLURM_RESTART_COUNT:-0}}" >> {runs}\n'
              '[ -n "${SLURM_RESTART_COUNT:-}" ] || exec sleep 120\n')
    job = slurm_cluster.sbatch(script, options=["--requeue", f"--output={tmp_path}/%j.out"], cwd=tmp_path)
    slurm_cluster.wait(job, states={"RUNNING"}, timeout=30)
    slurm_cluster.requeue(job)
    info = slurm_cluster.wait(job, states={"COMPLETED"}, timeout=30)
    assert runs.read_text().split() == ["0", "1"]
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0"


def test_a_job_reads_slurms_kill_wait_and_a_held_rank_ends_within_it(slurm_cluster: SlurmCluster,
                                                                        tmp_path: Path) -> None:
    """largessl reads KillWait in a job (launch/slurm.kill_wait_s): after SIGTERM a held rank ends at half of it,
    before SLURM's SIGKILL (lifecycle.StopSignals.grace_s); outside a job it is not asked."""
    code = ("from largessl.launch import slurm; from largessl.lifecycle import StopSignals; import signal; "
            "stops = StopSignals(); stops.kill_wait_s = slurm.kill_wait_s(); "
            "print(stops.kill_wait_s, stops.grace_s(signal.SIGTERM), stops.grace_s(signal.SIGUSR1))")
    script = f"#!/bin/bash\nsrun {sys.executable} -c '{code}'\n"
    job = slurm_cluster.sbatch(script, options=["--ntasks=1", f"--output={tmp_path}/%j.out"], cwd=tmp_path,
                               env=job_env(tmp_path))
    info = slurm_cluster.wait(job, states={"COMPLETED"}, timeout=30)
    assert slurm_cluster.output(job, info).split() == [f"{KILL_WAIT:.1f}", f"{KILL_WAIT / 2:g}", "20.0"]
    from largessl.launch import slurm

    assert "SLURM_JOB_ID" not in os.environ and slurm.kill_wait_s() is None


def test_signal_reaches_the_tasks_not_the_batch_shell(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """`scancel --signal=USR1 JOB` (what --signal=USR1@600 does at the time limit) reaches every srun task."""
    handler = ("import os, signal, sys, time\n"
               "signal.signal(signal.SIGUSR1, lambda *_: (print('USR1', os.environ['SLURM_PROCID'], flush=True),"
               " sys.exit(0)))\n"
               "open(f\"ready{os.environ['SLURM_PROCID']}\", 'w').close()\ntime.sleep(60)\n")
    (tmp_path / "task.py").write_text(handler)
    script = f"#!/bin/bash\nsrun {sys.executable} -u task.py\necho batch shell still here\n"
    job = slurm_cluster.sbatch(script, options=["--ntasks=2", f"--output={tmp_path}/%j.out"], cwd=tmp_path)
    slurm_cluster.wait(job, states={"RUNNING"}, timeout=30)
    wait_for_files([tmp_path / "ready0", tmp_path / "ready1"], timeout=30)
    slurm_cluster.signal(job, "USR1")
    info = slurm_cluster.wait(job, states={"COMPLETED"}, timeout=30)
    assert sorted(slurm_cluster.output(job, info).splitlines()) == ["USR1 0", "USR1 1", "batch shell still here"]


def wait_for_files(paths: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        assert time.monotonic() < deadline, f"not written within {timeout} s: {[str(p) for p in paths]}"
        time.sleep(0.1)


@pytest.mark.parametrize("script", sorted(PRETRAIN))
def test_pretrain_script_runs_shrunk_to_this_node(slurm_cluster: SlurmCluster, tmp_path: Path, script: str) -> None:
    """Each script's srun line starts two ranks of `largessl pretrain`, passing the overrides through."""
    path = REPO / "slurm" / script
    (tmp_path / "logs").mkdir()
    full = slurm_cluster.command("sbatch", "--test-only", str(path), cwd=tmp_path, check=False)
    assert full.returncode != 0 and "node configuration is not available" in full.stderr  # the headers' 4 (2) nodes
    none = slurm_cluster.command("sbatch", "--test-only", *SHRINK, "--gpus-per-node=0", str(path), cwd=tmp_path)
    assert "to start at" in none.stderr

    job = slurm_cluster.sbatch(path, "--print-config", "run.name=slurm-test", "data.train=/shards/x",
                               options=SHRINK, env=job_env(tmp_path), cwd=tmp_path)
    info = slurm_cluster.wait(job, states={"COMPLETED"}, timeout=60)
    name = info["JobName"]
    assert Path(info["StdOut"]) == tmp_path / "logs" / f"{name}-{job}.out"
    assert info["Requeue"] == "1" and info["TresPerNode"] == "gres:gpu:8" and info["NumTasks"] == "2"
    output = slurm_cluster.output(job, info)
    assert output.count("name: slurm-test") == 2 and output.count("train: /shards/x") == 2, output
    assert output.count(f"name: {PRETRAIN[script]}") == 2, output


def synset_folders(root: Path, per_class: int) -> Path:
    """An ImageNet-22K-style tree (one folder of JPEGs per wnid) from the bundled images."""
    for wnid in CLASSES:
        (root / wnid).mkdir(parents=True)
        for image in sorted((MINI_IMAGES / "train" / wnid).glob("*.JPEG"))[:per_class]:
            shutil.copy(image, root / wnid / image.name)
    return root


def test_convert_in22k_script(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    src, out = synset_folders(tmp_path / "src", per_class=4), tmp_path / "shards" / "in22k"
    (tmp_path / "logs").mkdir()
    job = slurm_cluster.sbatch(REPO / "slurm" / "convert_in22k.sh", str(src), str(out), "--samples-per-shard", "16",
                               options=["--cpus-per-task=2", "--time=10"], env=job_env(tmp_path), cwd=tmp_path)
    info = slurm_cluster.wait(job, states={"COMPLETED"}, timeout=120)
    log = slurm_cluster.output(job, info)
    assert info["ExitCode"] == "0:0", log
    assert Path(info["StdOut"]) == tmp_path / "logs" / f"convert_in22k-{job}.out"
    assert "2 busy worker(s)" in log and f"OK {out}: train 40 samples in 3 shards" in log, log
    assert sorted(p.name for p in out.glob("*.tar")) == [f"train-{i:06d}.tar" for i in range(3)]
