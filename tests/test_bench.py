"""`largessl bench` on the CPU debug recipes and real shards: the three modes print their report and one JSON line
(also written to --json) whose fields hang together: images/s from the measured step time, TFLOP/s from the FLOP
model, MFU against the given peak, the data/compute split; bad arguments end in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_largessl
from test_train import ok

from largessl.config.load import load_config
from largessl.objectives import objective_class


def bench(shards: Path, workdir: Path, recipe: str, *extra: str) -> dict:
    result = ok(run_largessl(["bench", "--config", recipe, "--steps", "3", "--warmup", "1", "--json", "out/b.json",
                              *extra, f"data.train={shards}", f"data.val={shards}", "data.num_workers=1"], workdir))
    line = result.stdout.strip().splitlines()[-1]
    assert (workdir / "out" / "b.json").read_text().strip() == line
    assert f"bench {recipe} (" in result.stdout
    return json.loads(line)


def flops_of(recipe: str) -> float:
    cfg = load_config(recipe, [])
    return objective_class(cfg.objective.name)(cfg.objective, cfg.model).flops_per_image().train_step


def test_end_to_end_bench_reports_consistent_speed_and_mfu(mini_shards: Path, tmp_path: Path) -> None:
    out = bench(mini_shards, tmp_path, "debug/mae_vit_tiny", "distributed.peak_tflops=0.5")
    assert (out["mode"], out["steps"], out["warmup"], out["world_size"], out["method"]) == (
        "end-to-end", 3, 1, 1, "mae")
    assert out["images_per_sec"] == pytest.approx(out["global_batch"] / out["step_time_s"])
    assert out["flops_per_image"] == pytest.approx(flops_of("debug/mae_vit_tiny"))
    assert out["tflops_per_gpu"] == pytest.approx(out["flops_per_image"] * out["images_per_sec"] / 1e12)
    assert out["mfu"] == pytest.approx(out["tflops_per_gpu"] / 0.5) and out["peak_tflops"] == 0.5
    assert 0 <= out["data_wait_fraction"] < 1 and out["compute_s_per_step"] > 0 and out["peak_mem_gb"] > 0.1
    assert out["data_wait_s_per_step"] + out["compute_s_per_step"] == pytest.approx(out["step_time_s"])
    assert not (tmp_path / "runs").exists()  # a scratch run directory, removed
    assert out["attention_kernel"] is None  # which fused kernel runs is asked on a GPU only


@pytest.mark.slow  # ~25 s; the default suite keeps the end-to-end mode
def test_synthetic_bench_feeds_one_batch_without_waiting(mini_shards: Path, tmp_path: Path) -> None:
    out = bench(mini_shards, tmp_path, "debug/sim_vit_tiny", "--synthetic")
    assert out["mode"] == "synthetic" and out["method"] == "sim" and out["data_wait_s_per_step"] == 0.0
    assert out["mfu"] is None and out["tflops_per_gpu"] > 0  # no peak on CPU: TFLOP/s only


@pytest.mark.slow  # ~20 s
def test_data_only_bench_times_the_input_pipeline_alone(mini_shards: Path, tmp_path: Path) -> None:
    out = bench(mini_shards, tmp_path, "debug/dino_vit_tiny", "--data-only")
    assert out["mode"] == "data-only" and out["num_workers"] == 1 and out["images_per_sec"] > 1
    assert out["images_per_sec"] == pytest.approx(out["micro_batch"] / out["batch_s"])
    assert "tflops_per_gpu" not in out and out["decode"] == "cpu"
    gpu_path = bench(mini_shards, tmp_path, "debug/mae_vit_tiny", "--data-only", "data.decode=gpu")
    assert gpu_path["decode"] == "gpu" and gpu_path["images_per_sec"] > 1  # workers and the device stage, timed


def test_bad_bench_arguments_end_in_one_line(mini_shards: Path, tmp_path: Path) -> None:
    for argv, said in ((["--steps", "0"], "--steps must be >= 1"),
                       (["--synthetic", "--data-only"], "not allowed with argument"),
                       (["optim.nope=1"], "unknown config key 'optim.nope'")):
        result = run_largessl(["bench", "--config", "debug/mae_vit_tiny", *argv, f"data.train={mini_shards}",
                               f"data.val={mini_shards}"], tmp_path)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and said in last and "Traceback" not in result.stderr, result.stderr
