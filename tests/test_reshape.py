"""Checkpoints resume on another number of ranks (distributed/reshape.py), through real DeepSpeed on gloo.

tests/reshape_worker.py trains a tiny objective (three parameter groups with their own step counts, an EMA
teacher, a frozen parameter, a buffer, an extra state) at several ZeRO stages and precisions, one engine after
another in one process group: uninterrupted on 1 and on 2 ranks with the same global batch, each saving a
checkpoint on the way. Then each world size resumes the other's checkpoints and must hold the writer's state
exactly, the uninterrupted run's state within fp32 reduction order, and train on with its losses. Three launches
per set of cases: 1 rank trains; 2 ranks train and resume the 1-rank checkpoints; 1 rank resumes the 2-rank ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, child_env, free_port

# `z{stage}[o]-{precision}` (o: optimizer offloaded to the CPU); the last case also meets a model that does not fit.
CASES = ["z0-fp32", "z1-fp32", "z3-fp32", "z2-bf16", "z2-fp32"]
SLOW_CASES = ["z0-bf16", "z1-bf16", "z3-bf16", "z3o-fp32", "z3o-bf16"]
WORKER = REPO / "tests" / "reshape_worker.py"


def torchrun(out: Path, nproc: int, modes: str, cases: list[str]) -> str:
    """The worker on `nproc` ranks; its stdout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(WORKER), str(out), modes, ",".join(cases)]
    done = subprocess.run(cmd, cwd=out, env=child_env(out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def assert_resumed_exactly(out: Path, world: int, cases: list[str], stdout: str) -> dict:
    """Every case resumed without a problem, and rank 0 said once per resharded checkpoint how long it took."""
    result = json.loads((out / f"result_w{world}.json").read_text())
    assert {case: result.get(case) for case in cases} == {case: [] for case in cases}
    lines = [line for line in stdout.splitlines() if "ZeRO partitions were redistributed" in line]
    assert len(lines) == sum(not case.startswith("z0") for case in cases), stdout  # ZeRO-0 loads as it is
    assert all(f"was written on {3 - world} rank(s)" in line and line.endswith(" s") for line in lines), lines
    return result


def assert_misfit_is_one_line(result: dict) -> None:
    """A model that does not fit the checkpoint: one line naming what is missing, no DeepSpeed traceback."""
    assert result["misfit"].startswith("SharedError: ") and "holds no 'head2.weight'" in result["misfit"]
    assert "\n" not in result["misfit"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """1 rank trains; then 2 ranks train (their checkpoints and reference) and resume the 1-rank checkpoints."""
    out = tmp_path_factory.mktemp("reshape")
    torchrun(out, 1, "train", CASES)
    return out, torchrun(out, 2, "train+load", CASES)


def test_one_rank_checkpoints_resume_on_two_ranks_as_if_uninterrupted(two_ranks: tuple[Path, str]) -> None:
    out, stdout = two_ranks
    assert_misfit_is_one_line(assert_resumed_exactly(out, 2, CASES, stdout))


def test_two_rank_checkpoints_resume_on_one_rank_as_if_uninterrupted(two_ranks: tuple[Path, str]) -> None:
    out, _ = two_ranks
    assert_misfit_is_one_line(assert_resumed_exactly(out, 1, CASES, torchrun(out, 1, "load", CASES)))


@pytest.mark.slow
def test_bf16_at_every_stage_and_offload_resume_both_ways(tmp_path: Path) -> None:
    torchrun(tmp_path, 1, "train", SLOW_CASES)
    assert_resumed_exactly(tmp_path, 2, SLOW_CASES, torchrun(tmp_path, 2, "train+load", SLOW_CASES))
    assert_resumed_exactly(tmp_path, 1, SLOW_CASES, torchrun(tmp_path, 1, "load", SLOW_CASES))
