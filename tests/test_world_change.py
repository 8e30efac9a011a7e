"""A run resumed on another number of ranks (DINO: EMA teacher and center; data.order=global), through the CLI.

For each direction (two ranks -> one, one -> two), the run is resumed at step 2 from a checkpoint written on the
other world size; its losses after the resume must equal, within fp32 tolerance, those of an uninterrupted run on
the new world size with the same global batch (the only difference is the reduction order of the first steps).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import read_metrics, run_largessl
from test_dino_train import dino_run
from test_train import ok

from largessl.distributed.ema import read_teacher_fp32

COMMON = ["data.order=global", "model.drop_path_rate=0", "trainer.max_steps=4", "trainer.ckpt_every=2",
          "trainer.keep_last=3", "tracking.enabled=false", "objective.freeze_last_layer_steps=1",
          "data.num_workers=1"]
KEYS = ("loss", "teacher_entropy", "center_norm", "kl_teacher_student")


def cut_at(runs: Path, source: str, name: str, step: int) -> None:
    """A copy of run `source` as a job killed after its checkpoint of `step` would have left it."""
    shutil.copytree(runs / source, runs / name)
    checkpoints = runs / name / "checkpoints"
    for tag in checkpoints.glob("step_*"):
        if int(tag.name[5:]) > step:
            shutil.rmtree(tag)
    (checkpoints / "latest").write_text(f"step_{step:08d}")
    metrics = runs / name / "metrics.jsonl"
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(keepends=True)
                               if json.loads(line)["step"] <= step))


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_resume_on_another_world_size_repeats_the_uninterrupted_run(stage: int, mini_shards: Path,
                                                                    tmp_path: Path) -> None:
    common = [*COMMON, f"distributed.zero_stage={stage}"]
    for name, nproc in (("on2", 2), ("on1", 1)):
        ok(run_largessl(dino_run(mini_shards, mini_shards, name, *common), tmp_path, nproc=nproc))
    runs = tmp_path / "runs"
    one, two = read_metrics(runs / "on1"), read_metrics(runs / "on2")  # first: two ranks repeat the one-rank run
    for step in range(1, 5):
        for key in KEYS:
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-6), (step, key)
    for source, name, nproc, reference in (("on2", "2to1", 1, "on1"), ("on1", "1to2", 2, "on2")):
        cut_at(runs, source, name, 2)
        result = ok(run_largessl(dino_run(mini_shards, mini_shards, name, *common), tmp_path, nproc=nproc))
        assert "resumed from" in result.stdout and "(step 2)" in result.stdout, result.stdout[-2000:]
        assert "continues sample for sample" in result.stdout, result.stdout[-2000:]
        resumed, straight = read_metrics(runs / name), read_metrics(runs / reference)
        for step in (3, 4):
            for key in KEYS:
                assert resumed[step][key] == pytest.approx(straight[step][key], rel=1e-4, abs=1e-6), (name, step, key)
        teachers = [read_teacher_fp32(runs / run / "checkpoints" / "step_00000004") for run in (name, reference)]
        for key, value in teachers[1].items():
            assert teachers[0][key].allclose(value, rtol=1e-4, atol=1e-6), (name, key)
