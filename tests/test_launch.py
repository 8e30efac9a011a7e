"""Ranks from SLURM's variables for a simulated 4-node x 8-GPU job (environment only, no processes)."""

from __future__ import annotations

import pytest

from largessl.launch.slurm import first_host, rank_env

NODES = "gpu[017-019,042]"


def task_env(procid: int) -> dict[str, str]:
    """What srun sets in task `procid` of `srun` in a 4 x 8 job (sbatch --nodes=4 --ntasks-per-node=8)."""
    return {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(procid % 8), "SLURM_NODEID": str(procid // 8), "SLURM_NTASKS": "32",
            "SLURM_STEP_NUM_TASKS": "32", "SLURM_JOB_NODELIST": NODES, "SLURM_STEP_NODELIST": NODES,
            "SLURM_TASKS_PER_NODE": "8(x4)", "SLURM_STEP_TASKS_PER_NODE": "8(x4)"}


def test_every_task_of_a_4x8_job_gets_its_rank_and_one_rendezvous() -> None:
    mapped = [rank_env(task_env(p)) for p in range(32)]
    assert [int(m["RANK"]) for m in mapped] == list(range(32))
    assert [int(m["LOCAL_RANK"]) for m in mapped] == [p % 8 for p in range(32)]
    assert {m["WORLD_SIZE"] for m in mapped} == {"32"}
    assert {m["LOCAL_WORLD_SIZE"] for m in mapped} == {"8"}
    assert {(m["MASTER_ADDR"], m["MASTER_PORT"]) for m in mapped} == {("gpu017", str(20000 + 123456 % 20000))}


def test_variables_already_set_are_kept() -> None:
    assert rank_env({**task_env(5), "RANK": "5", "WORLD_SIZE": "32"}) == {}  # torchrun inside srun
    kept = rank_env({**task_env(5), "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert "MASTER_ADDR" not in kept and "MASTER_PORT" not in kept and kept["RANK"] == "5"


def test_the_batch_script_itself_is_not_a_rank() -> None:
    batch = {k: v for k, v in task_env(0).items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS")}
    assert rank_env(batch) == {}
    assert rank_env({**batch, "SLURM_STEP_ID": "batch"}) == {}
    assert rank_env({}) == {}


@pytest.mark.parametrize(("nodelist", "first"), [
    ("gpu[017-019,042]", "gpu017"), ("node7", "node7"), ("a12,b[1-3]", "a12"), ("r[1-2]-n[07-08],x1", "r1-n07"),
    ("n[0009,0011]", "n0009"), ("login-3", "login-3"),
])
def test_first_host_of_a_host_list(nodelist: str, first: str) -> None:
    assert first_host(nodelist) == first
