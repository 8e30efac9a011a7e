"""End to end through the real command: DeepSpeed on CPU (gloo), real JPEG shards, a real MLflow store."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import REPO, child_env, free_port, read_metrics, run_largessl, serve_mlflow, uneven_dataset

DEBUG = ["pretrain", "--config", "debug/mae_vit_tiny"]


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# ----------------------------------------------------------------------------- one process on Imagenette


@pytest.fixture(scope="module")
def imagenette_run(imagenette_shards: Path, mini_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 MAE steps of ViT-Tiny on Imagenette's 9,469 training images, k-NN monitored on the mini set."""
    work = tmp_path_factory.mktemp("imagenette-run")
    ok(run_largessl([*DEBUG, f"data.train={imagenette_shards}", f"data.val={imagenette_shards}", "run.name=in",
                     "trainer.max_steps=100", "trainer.log_every=10", "trainer.ckpt_every=50", "eval.knn_every=50",
                     f"eval.knn_train={mini_shards}", f"eval.knn_val={mini_shards}", f"distributed.peak_tflops={PEAK}"],
                    work))
    return work


PEAK = 0.5  # TFLOP/s: a made-up peak for this CPU, so that `mfu` is logged


def test_loss_falls_over_100_steps(imagenette_run: Path) -> None:
    metrics = read_metrics(imagenette_run / "runs" / "in")
    assert sorted(metrics) == list(range(10, 101, 10))
    losses = [metrics[s]["loss"] for s in sorted(metrics)]
    assert losses[-1] < losses[0] - 0.15, losses
    assert losses[-1] < min(losses[:3]), losses


def test_checkpoints_keep_the_last_k(imagenette_run: Path) -> None:
    ckpt = imagenette_run / "runs" / "in" / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000050", "step_00000100"]
    assert (ckpt / "latest").read_text().strip() == "step_00000100"


def test_mlflow_sqlite_contents(imagenette_run: Path) -> None:
    client = mlflow_client(f"sqlite:///{imagenette_run / 'mlflow.db'}")  # MLflow's default store, in the cwd
    run = client.search_runs([client.get_experiment_by_name("largessl-debug").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "in"
    params, tags = run.data.params, run.data.tags
    assert params["optim.base_lr"] == "0.001" and params["model.name"] == "vit_tiny_patch16"
    assert params["objective.mask_ratio"] == "0.75" and params["derived.accumulation_steps"] == "2"
    assert (tags["method"], tags["model"], tags["world_size"]) == ("mae", "vit_tiny_patch16", "1")
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["git_commit"])
    for key in ("loss", "lr", "weight_decay", "grad_norm", "loss_scale", "images_per_sec", "step_time",
                "peak_mem_gb"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(10, 101, 10)), key
    knn = client.get_metric_history(run.info.run_id, "knn_top1")
    assert sorted(m.step for m in knn) == [50, 100] and all(0 <= m.value <= 1 for m in knn)
    # MFU from the FLOP model: tflops_per_gpu = training FLOPs per image x img/s, mfu = that / the given peak
    from largessl.config.load import load_config
    from largessl.objectives.mae import MAE

    cfg = load_config("debug/mae_vit_tiny", [])
    per_image = MAE(cfg.objective, cfg.model).flops_per_image().train_step
    for logged in read_metrics(imagenette_run / "runs" / "in").values():
        assert logged["tflops_per_gpu"] == pytest.approx(per_image * logged["images_per_sec"] / 1e12, rel=1e-6)
        assert logged["mfu"] == pytest.approx(logged["tflops_per_gpu"] / PEAK, rel=1e-6)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "mfu")) == list(range(10, 101, 10))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "ds_config.json"} <= artifacts


@pytest.mark.slow  # 46 s (3,925 queries); test_dino_train.py runs `eval knn` on a checkpoint in the default suite
def test_knn_eval_command_is_above_chance(imagenette_run: Path, imagenette_shards: Path, mini_shards: Path) -> None:
    # Queries: Imagenette's 3,925 val images; neighbours: the 500 bundled train images (CPU time).
    result = ok(run_largessl(["eval", "knn", "--checkpoint", "runs/in", "--train", str(mini_shards),
                              "--val", str(imagenette_shards), "--num-workers", "2"], imagenette_run))
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"knn_top1: 0\.\d{4}", last)
    top1 = float(last.split()[-1])
    assert top1 > 0.2, top1  # ten classes: chance is 0.1
    assert "500 neighbours, 3925 queries" in result.stdout
    client = mlflow_client(f"sqlite:///{imagenette_run / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("largessl-debug").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, "knn_top1")
    logged = [m for m in history if m.value == pytest.approx(top1, abs=5e-5)]
    assert logged and logged[-1].step == 100
    saved = json.loads((imagenette_run / "runs" / "in" / "eval" / "knn_step00000100.json").read_text())
    assert saved["knn_top1"] == pytest.approx(top1, abs=5e-5)


# ----------------------------------------------------------------------------- ZeRO across processes


def mini_run(mini_shards: Path, name: str, *extra: str) -> list[str]:
    return [*DEBUG, f"data.train={mini_shards}", f"data.val={mini_shards}", f"run.name={name}", *extra]


def test_two_processes_at_zero2_and_zero3_match_one_process(mini_shards: Path, tmp_path: Path) -> None:
    # The 'global' data order makes the global batches independent of the number of ranks. ZeRO-3 also runs
    # with activation checkpointing (which must not change the maths) and evaluates k-NN with gathered weights.
    common = ["data.order=global", "data.micro_batch_size=16", "optim.global_batch_size=32", "trainer.max_steps=6",
              "trainer.log_every=1", "tracking.enabled=false", "eval.knn_every=6"]
    ok(run_largessl(mini_run(mini_shards, "one", *common, "distributed.zero_stage=0"), tmp_path))
    ok(run_largessl(mini_run(mini_shards, "two2", *common, "distributed.zero_stage=2"), tmp_path, nproc=2))
    ok(run_largessl(mini_run(mini_shards, "two3", *common, "distributed.zero_stage=3", "model.grad_checkpointing=true"),
                    tmp_path, nproc=2))
    one = read_metrics(tmp_path / "runs" / "one")
    for name in ("two2", "two3"):
        two = read_metrics(tmp_path / "runs" / name)
        for step in range(1, 7):
            assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-4), (name, step)
            assert two[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-3), (name, step)
        assert two[6]["knn_top1"] == pytest.approx(one[6]["knn_top1"], abs=0.011), name  # 200 queries


def test_vit_huge_is_built_partitioned_under_zero3(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(REPO / "tests" / "zero3_build.py"), "vit_huge_patch14", str(tmp_path)],
        cwd=tmp_path, env=child_env(tmp_path), capture_output=True, text=True, timeout=600)
    ok(result)
    reports = [json.loads(path.read_text()) for path in tmp_path.glob("rank*.json")]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for report in reports:
        assert report["total"] == pytest.approx(657e6, rel=0.01)  # ViT-H/14 encoder + 8 x 512 decoder
        assert 0.49 < report["local"] / report["total"] < 0.51  # each rank holds its half
        assert report["largest_full_tensor"] < 1e6  # only small (persistent) tensors stay whole


# ----------------------------------------------------------------------------- precision, resume


def test_bf16_run(mini_shards: Path, tmp_path: Path) -> None:
    # bf16 matrix products are slow on CPUs without bf16 units: keep this run short.
    ok(run_largessl(mini_run(mini_shards, "bf16", "distributed.precision=bf16", "distributed.zero_stage=2",
                             "data.micro_batch_size=16", "optim.global_batch_size=16", "trainer.max_steps=6",
                             "trainer.log_every=3"), tmp_path))
    run = tmp_path / "runs" / "bf16"
    assert json.loads((run / "ds_config.json").read_text())["bf16"] == {"enabled": True}
    metrics = read_metrics(run)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics.values())
    assert sorted(metrics) == [3, 6]
    states = torch.load(run / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["module"]["encoder.blocks.0.attn.qkv.weight"].dtype == torch.bfloat16  # computed in bf16
    # The same run name with another model cannot resume: one line, exit 2, no traceback.
    line = last_error(run_largessl(mini_run(mini_shards, "bf16", "distributed.precision=bf16",
                                            "distributed.zero_stage=2", "model.name=vit_small_patch16"), tmp_path))
    assert line.startswith("largessl: error: cannot resume from") and "use another run.name" in line
    assert "vit_tiny_patch16" in (run / "config.yaml").read_text()  # the run directory keeps its config


def test_zero1_run(mini_shards: Path, tmp_path: Path) -> None:
    ok(run_largessl(mini_run(mini_shards, "zero1", "distributed.zero_stage=1", "trainer.max_steps=4",
                             "trainer.log_every=2", "tracking.enabled=false"), tmp_path))
    metrics = read_metrics(tmp_path / "runs" / "zero1")
    assert sorted(metrics) == [2, 4] and metrics[4]["grad_norm"] > 0
    assert json.loads((tmp_path / "runs" / "zero1" / "ds_config.json").read_text())["zero_optimization"]["stage"] == 1


def start(args: list[str], workdir: Path, nproc: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "largessl", *args]
    return subprocess.Popen(cmd, cwd=workdir, env=child_env(workdir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # 60 s; the default suite resumes in test_slurm_train (SIGUSR1, SIGKILL), test_world_change
def test_resume_after_preemption_repeats_the_uninterrupted_losses(mini_shards: Path, tmp_path: Path) -> None:
    # Two ranks x two workers over uneven shards, through an epoch boundary (7 batches per reader and epoch).
    common = ["data.micro_batch_size=16", "optim.global_batch_size=32", "data.num_workers=2",
              "distributed.zero_stage=2", "trainer.max_steps=18", "trainer.log_every=1", "trainer.ckpt_every=100"]
    ok(run_largessl(mini_run(mini_shards, "straight", *common), tmp_path, nproc=2))

    job = start(mini_run(mini_shards, "preempted", *common), tmp_path, nproc=2)
    output = []
    for line in job.stdout:
        output.append(line)
        if line.startswith("step 5/18"):
            job.send_signal(signal.SIGTERM)  # what SLURM sends before a preemption
    job.wait(timeout=300)
    text = "".join(output)
    assert "stopped by SIGTERM at step" in text, text[-3000:]
    stopped_at = int(re.search(r"stopped by SIGTERM at step (\d+)", text)[1])
    assert 5 <= stopped_at < 18
    ok(run_largessl(mini_run(mini_shards, "preempted", *common), tmp_path, nproc=2))  # the same command again

    straight, resumed = read_metrics(tmp_path / "runs" / "straight"), read_metrics(tmp_path / "runs" / "preempted")
    assert sorted(resumed) == list(range(1, 19))
    for step in range(1, 19):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-5, abs=1e-6), step
    client = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("largessl-debug").experiment_id],
                              filter_string="attributes.run_name = 'preempted'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the resumed job continued the same run
    losses = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, 19))


# ----------------------------------------------------------------------------- tracking servers


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    with serve_mlflow(root, f"sqlite:///{root / 'server.db'}") as uri:
        yield uri


def test_logs_to_a_real_mlflow_server(mlflow_server: str, mini_shards: Path, tmp_path: Path) -> None:
    ok(run_largessl(mini_run(mini_shards, "served", f"tracking.uri={mlflow_server}", "tracking.experiment=srv",
                             "trainer.max_steps=4", "trainer.log_every=2"), tmp_path))
    assert not (tmp_path / "mlflow.db").exists()
    client = mlflow_client(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("srv").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.params["trainer.max_steps"] == "4"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
    assert {"config.yaml", "ds_config.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_unreachable_server_warns_once_and_trains(mini_shards: Path, tmp_path: Path) -> None:
    result = ok(run_largessl(mini_run(mini_shards, "offline", f"tracking.uri=http://127.0.0.1:{free_port()}",
                                      "trainer.max_steps=4", "trainer.log_every=2", "tracking.flush_timeout_s=2"),
                             tmp_path))
    assert result.stderr.count("cannot be reached") == 1
    assert sorted(read_metrics(tmp_path / "runs" / "offline")) == [2, 4]


# ----------------------------------------------------------------------------- bad input


def last_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_missing_shard_stops_the_run_with_its_name(mini_shards: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(mini_shards, broken)
    (broken / "train-000002.tar").unlink()
    line = last_error(run_largessl(mini_run(broken, "missing"), tmp_path))
    assert re.fullmatch(r"largessl: error: missing shard \S*train-000002\.tar \(listed in \S*dataset\.json\)", line)


def test_empty_dataset_stops_the_run(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "dataset.json").write_text(json.dumps(
        {"format": "largessl-wds/1", "classes": [], "splits": {"train": {"num_samples": 0, "shards": []}}}))
    line = last_error(run_largessl(mini_run(empty, "empty"), tmp_path))
    assert line.startswith("largessl: error: data.train: split 'train' of dataset")
    assert line.endswith("is empty (0 samples)")


def test_corrupt_jpeg_is_skipped_and_recorded(tmp_path: Path) -> None:
    data = uneven_dataset(tmp_path / "corrupt", [100, 92], corrupt_at=3)  # one epoch = 6 batches of 32
    ok(run_largessl([*DEBUG, f"data.train={data}", "run.name=corrupt", "trainer.max_steps=3",
                     "trainer.log_every=3", "tracking.enabled=false"], tmp_path))
    run = tmp_path / "runs" / "corrupt"
    assert read_metrics(run)[3]["data/corrupt_images"] == 1
    entries = [json.loads(line) for line in (run / "corrupt_samples.jsonl").read_text().splitlines()]
    assert entries[0] == {"key": "s00003", "shard": entries[0]["shard"], "rank": 0, "epoch": 0}
    assert {e["key"] for e in entries} == {"s00003"}  # read again in later (prefetched) epochs, logged again


@pytest.mark.slow
def test_zero3_with_cpu_offload(mini_shards: Path, tmp_path: Path) -> None:
    ok(run_largessl(mini_run(mini_shards, "offload", "distributed.zero_stage=3", "distributed.offload=true",
                             "trainer.max_steps=4", "trainer.log_every=2", "tracking.enabled=false"), tmp_path))
    assert sorted(read_metrics(tmp_path / "runs" / "offload")) == [2, 4]
