"""A process computes with its share of the CPUs it may run on, less its DataLoader workers (largessl/cpus.py):
with torch's default (one thread per core of the machine) MAE ViT-Tiny ran 16-21x slower on a busy 2-core box."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, child_env, run_largessl

from largessl import cpus

CPUS = len(os.sched_getaffinity(0))
SRUN_TASK = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}


@pytest.mark.parametrize(("line", "expected"), [("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1),
                                                ("max 100000", None), ("", None), ("x y", None), ("-1 100000", None)])
def test_a_cgroup_quota_is_read_as_whole_cpus_rounded_up(line: str, expected: int | None) -> None:
    assert cpus.quota_cpus(line) == expected


def test_the_share_is_the_usable_cpus_over_the_ranks_sharing_them_less_the_workers() -> None:
    assert cpus.choose(0, "data.num_workers", {}).count == CPUS
    assert cpus.choose(1, "data.num_workers", {}).count == max(1, CPUS - 1)
    assert cpus.choose(CPUS + 5, "data.num_workers", {}).count == 1  # never below one
    torchrun = {"LOCAL_WORLD_SIZE": str(CPUS), "TORCHELASTIC_RUN_ID": "r"}  # one affinity set for all its ranks
    assert cpus.choose(0, "data.num_workers", torchrun).sharing == CPUS
    assert cpus.choose(0, "data.num_workers", torchrun).count == 1


def test_srun_tasks_take_their_cpus_per_task_and_share_the_node_without_it() -> None:
    given = cpus.choose(0, "data.num_workers", {**SRUN_TASK, "SLURM_CPUS_PER_TASK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (given.cpus, given.source, given.sharing, given.count) == (1, "SLURM's cpus per task", 1, 1)
    if CPUS >= 2:  # srun without --cpus-per-task: its tasks all see the node
        shared = cpus.choose(0, "data.num_workers", {**SRUN_TASK, "LOCAL_WORLD_SIZE": "2"})
        assert (shared.sharing, shared.count) == (2, CPUS // 2)
    batch_script = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "batch", "SLURM_CPUS_PER_TASK": "1"}
    assert cpus.choose(0, "data.num_workers", batch_script).cpus == CPUS  # not a task of a step


def test_omp_num_threads_in_the_environment_wins_and_an_invalid_one_does_not() -> None:
    kept = cpus.choose(CPUS, "data.num_workers", {"OMP_NUM_THREADS": "7"})
    assert kept.count == 7 and "OMP_NUM_THREADS=7 from the environment (unset, largessl would take 1" in kept.describe()
    assert cpus.choose(0, "data.num_workers", {"OMP_NUM_THREADS": "0"}).count == CPUS
    assert cpus.choose(0, "data.num_workers", {"OMP_NUM_THREADS": "many"}).count == CPUS


def test_too_many_workers_for_the_cpus_are_said() -> None:
    line = cpus.choose(CPUS + 3, "data.num_workers", {}).describe()
    assert f"{CPUS + 3} workers and the rank have {CPUS} CPU(s): they will wait on each other" in line
    assert "wait on each other" not in cpus.choose(0, "data.num_workers", {}).describe()


def torch_threads(affinity: set[int], workers: int) -> tuple[str, int]:
    """In a fresh process with `affinity` and no OMP_NUM_THREADS: the line said and torch's thread count."""
    probe = (f"import os, sys\nos.sched_setaffinity(0, {affinity!r})\nfrom largessl import cpus\n"
             f"print(cpus.apply({workers}, 'data.num_workers'))\nimport torch\nprint(torch.get_num_threads())")
    env = {k: v for k, v in child_env(REPO).items() if k not in cpus.VARIABLES}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    line, threads = done.stdout.strip().splitlines()[-2:]
    return line, int(threads)


def test_torch_computes_with_the_chosen_threads() -> None:
    line, threads = torch_threads({0}, 0)
    assert threads == 1 and line.startswith("CPU threads: 1 per rank (1 CPUs usable (CPU affinity)")
    everything = set(os.sched_getaffinity(0))
    line, threads = torch_threads(everything, 1)
    assert threads == max(1, len(everything) - 1), line


def test_pretrain_says_its_choice_before_loading_torch(mini_shards: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in child_env(tmp_path).items() if k not in cpus.VARIABLES}
    done = run_largessl(["pretrain", "--config", "debug/mae_vit_tiny", f"data.train={mini_shards}",
                         "trainer.max_steps=2", "tracking.enabled=false", "run.output_dir=runs"], tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    said = next(i for i, line in enumerate(lines) if line.startswith("CPU threads: "))
    assert lines[said].startswith(f"CPU threads: {max(1, CPUS - 1)} per rank ({CPUS} CPUs usable (CPU affinity), "
                                  "less 1 DataLoader worker (data.num_workers)")
    assert "loading PyTorch" in lines[said + 1]
