"""DINO trained end to end through the CLI on Imagenette shards: one process, two processes at ZeRO-2 and
ZeRO-3 (which must repeat the one-process run: the center and the teacher are global), the last-layer freeze,
collapse metrics in MLflow, k-NN on the teacher, and exact resume including the teacher and the center."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_largessl
from test_train import mlflow_client, ok

from largessl.distributed.ema import read_teacher_fp32
from largessl.distributed.engine import read_checkpoint

SMALL = ["model.image_size=32", "objective.local_crop_size=16", "objective.local_crops=2", "objective.out_dim=1024",
         "data.micro_batch_size=8", "optim.global_batch_size=16", "trainer.log_every=1", "data.shuffle_buffer=50"]


def dino_run(train: Path, knn: Path, name: str, *extra: str) -> list[str]:
    return ["pretrain", "--config", "debug/dino_vit_tiny", f"data.train={train}", f"data.val={knn}",
            f"eval.knn_train={knn}", f"eval.knn_val={knn}", f"run.name={name}", *SMALL, *extra]


def test_one_process_dino_freezes_the_last_layer_logs_collapse_metrics_and_evaluates_the_teacher(
        imagenette_shards: Path, mini_shards: Path, tmp_path: Path) -> None:
    ok(run_largessl(dino_run(imagenette_shards, mini_shards, "one", "trainer.max_steps=4", "trainer.ckpt_every=1",
                             "trainer.keep_last=5", "eval.knn_every=4", "objective.freeze_last_layer_steps=2"),
                    tmp_path))
    run_dir = tmp_path / "runs" / "one"
    ckpts = {step: read_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}")[0] for step in (1, 2, 3)}
    last = "student.head.last_layer.weight_v"
    assert torch.equal(ckpts[1][last], ckpts[2][last])  # frozen for the first 2 steps
    assert not torch.equal(ckpts[2][last], ckpts[3][last])  # then trained
    assert not torch.equal(ckpts[1]["student.head.mlp.0.weight"], ckpts[2]["student.head.mlp.0.weight"])

    client = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("largessl-debug").experiment_id])[0]
    for key in ("loss", "teacher_entropy", "kl_teacher_student", "teacher_temp", "teacher_momentum", "center_norm"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2, 3, 4], key
    entropy = client.get_metric_history(run.info.run_id, "teacher_entropy")
    assert all(0 < m.value <= torch.log(torch.tensor(1024.0)).item() + 1e-4 for m in entropy)

    # k-NN reads the teacher's exact fp32 weights, in training and from the checkpoint.
    from largessl.eval.standalone import load_encoder

    encoder, _, _, tag_dir = load_encoder(run_dir)
    teacher = read_teacher_fp32(tag_dir)
    student = read_checkpoint(tag_dir)[0]
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, teacher[f"teacher.backbone.{name}"]), name
    assert not torch.equal(teacher["teacher.backbone.blocks.0.attn.qkv.weight"],
                           student["student.backbone.blocks.0.attn.qkv.weight"])
    result = ok(run_largessl(["eval", "knn", "--checkpoint", "runs/one", "--train", str(mini_shards), "--val",
                              str(mini_shards)], tmp_path))
    top1 = float(result.stdout.strip().splitlines()[-1].split()[-1])
    assert top1 == pytest.approx(read_metrics(run_dir)[4]["knn_top1"], abs=5e-5)


@pytest.mark.slow  # 65 s; test_world_change.py checks two ranks = one at ZeRO-3 in the default suite
def test_two_processes_at_zero2_and_zero3_repeat_the_one_process_run(imagenette_shards: Path, mini_shards: Path,
                                                                     tmp_path: Path) -> None:
    # Same global batches for any number of ranks ('global' order) and no drop path: with the center averaged
    # over all ranks and the teacher following the full student, the runs agree step by step.
    common = ["data.order=global", "model.drop_path_rate=0", "trainer.max_steps=4", "tracking.enabled=false",
              "objective.freeze_last_layer_steps=1"]
    ok(run_largessl(dino_run(imagenette_shards, mini_shards, "one", *common, "distributed.zero_stage=0"), tmp_path))
    ok(run_largessl(dino_run(imagenette_shards, mini_shards, "two2", *common, "distributed.zero_stage=2"), tmp_path,
                    nproc=2))
    ok(run_largessl(dino_run(imagenette_shards, mini_shards, "two3", *common, "distributed.zero_stage=3",
                             "model.grad_checkpointing=true"), tmp_path, nproc=2))
    runs = tmp_path / "runs"
    one = read_metrics(runs / "one")
    teacher_one = read_teacher_fp32(runs / "one" / "checkpoints" / "step_00000004")
    for name in ("two2", "two3"):
        two = read_metrics(runs / name)
        for step in range(1, 5):
            for key in ("loss", "teacher_entropy", "center_norm"):
                assert two[step][key] == pytest.approx(one[step][key], rel=1e-4), (name, step, key)
        teacher_two = read_teacher_fp32(runs / name / "checkpoints" / "step_00000004")
        for key, value in teacher_one.items():
            assert torch.allclose(teacher_two[key], value, atol=1e-5), (name, key)
    assert sorted(p.name for p in (runs / "two3" / "checkpoints" / "step_00000004").glob("teacher_fp32*")) == [
        "teacher_fp32_rank00000.pt", "teacher_fp32_rank00001.pt"]  # each rank saved its own partition


@pytest.mark.slow  # 70 s; test_world_change.py resumes DINO (teacher, center) at ZeRO-3 in the default suite
def test_resume_repeats_the_run_including_teacher_and_center(imagenette_shards: Path, mini_shards: Path,
                                                             tmp_path: Path) -> None:
    # Two ranks at ZeRO-3 in bf16 with drop path: a run of 6 steps, and the same run restarted from its step-3
    # checkpoint (as after a crash there), must agree exactly.
    common = ["trainer.max_steps=6", "trainer.ckpt_every=3", "tracking.enabled=false", "distributed.zero_stage=3",
              "distributed.precision=bf16", "objective.freeze_last_layer_steps=4"]
    ok(run_largessl(dino_run(imagenette_shards, mini_shards, "straight", *common), tmp_path, nproc=2))
    runs = tmp_path / "runs"
    shutil.copytree(runs / "straight", runs / "resumed")
    checkpoints = runs / "resumed" / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000006")
    (checkpoints / "latest").write_text("step_00000003")
    metrics = runs / "resumed" / "metrics.jsonl"
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(keepends=True)
                               if json.loads(line)["step"] <= 3))
    result = ok(run_largessl(dino_run(imagenette_shards, mini_shards, "resumed", *common), tmp_path, nproc=2))
    assert "resumed from" in result.stdout

    straight, resumed = read_metrics(runs / "straight"), read_metrics(runs / "resumed")
    for step in range(4, 7):
        for key in ("loss", "teacher_entropy", "center_norm", "kl_teacher_student"):
            assert resumed[step][key] == straight[step][key], (step, key)
    final = [read_teacher_fp32(runs / name / "checkpoints" / "step_00000006") for name in ("straight", "resumed")]
    for key, value in final[0].items():
        assert torch.equal(final[1][key], value), key
    centers = [read_checkpoint(runs / name / "checkpoints" / "step_00000006")[1]["objective"]["center"]
               for name in ("straight", "resumed")]
    assert torch.equal(centers[0], centers[1]) and centers[0].abs().sum() > 0
