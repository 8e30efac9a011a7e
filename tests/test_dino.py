"""DINO's pieces on cases with a known answer: loss over view pairs, centering over the effective batch,
schedules, head, learned positions for local crops, parameter groups and the last-layer freeze."""

from __future__ import annotations

import math

import pytest
import torch

from largessl.models.config import ModelConfig
from largessl.models.dino_head import DINOHead
from largessl.models.vit import ViTEncoder
from largessl.objectives.dino import DINO, DINOConfig, crop_major, dino_loss, updated_center
from largessl.optim.config import OptimConfig
from largessl.optim.param_groups import build_param_groups
from largessl.optim.schedules import apply_schedules, cosine, linear_warmup, weight_decay_at

TINY = ModelConfig(name="vit_tiny_patch16", image_size=32)


def tiny_dino(**overrides) -> DINO:
    cfg = DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crops=2, local_crop_size=16, **overrides)
    return DINO(cfg, TINY)


def test_loss_is_ln_k_for_a_uniform_student_and_teacher() -> None:
    k, b = 64, 3
    out = dino_loss(torch.zeros(4 * b, k), torch.zeros(2 * b, k), torch.zeros(1, k), student_temp=0.1,
                    teacher_temp=0.04, num_views=4)
    assert out["loss"].item() == pytest.approx(math.log(k), rel=1e-6)
    assert out["teacher_entropy"].item() == pytest.approx(math.log(k), rel=1e-6)
    assert out["kl_teacher_student"].item() == pytest.approx(0.0, abs=1e-5)


def test_loss_averages_the_pairs_of_different_views_only() -> None:
    # K = 2, one image, views: global 0, global 1, local 0. Teacher view 0 is (almost) one-hot on class 0,
    # teacher view 1 on class 1. Student view v puts probability p_v on class 0.
    p = [0.9, 0.2, 0.6]
    student = torch.tensor([[math.log(q), math.log(1 - q)] for q in p]) * 0.1  # divided by student_temp 0.1
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = dino_loss(student, teacher, torch.zeros(1, 2), student_temp=0.1, teacher_temp=1e-3, num_views=3)
    # pairs (teacher 0 -> students 1, 2) and (teacher 1 -> students 0, 2): 2 * 3 - 2 = 4 terms
    expected = (-math.log(p[1]) - math.log(p[2]) - math.log(1 - p[0]) - math.log(1 - p[2])) / 4
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["teacher_entropy"].item() == pytest.approx(0.0, abs=1e-6)


def test_center_subtracts_before_sharpening() -> None:
    # Equal teacher logits, but a center favouring class 0: the centred teacher prefers class 1.
    out = dino_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([[1.0, 0.0]]), student_temp=0.1,
                    teacher_temp=1.0, num_views=2)
    q1 = 1 / (1 + math.exp(-1.0))  # softmax([-1, 0])[1]
    assert out["teacher_entropy"].item() == pytest.approx(-(q1 * math.log(q1) + (1 - q1) * math.log(1 - q1)), rel=1e-5)


def test_center_moves_once_per_optimizer_step_over_the_whole_effective_batch() -> None:
    center = torch.zeros(1, 3)
    rows = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [5.0, 5.0, 5.0]])
    new = updated_center(center, rows.sum(0), torch.tensor(3.0), 0.9)
    assert torch.allclose(new, 0.1 * rows.mean(0, keepdim=True))

    model = tiny_dino()
    batches = [{"globals": torch.randn(2, 2, 3, 32, 32), "locals": torch.randn(2, 2, 3, 16, 16)} for _ in range(2)]
    outputs = []
    with torch.no_grad():
        for batch in batches:  # two micro-batches of one optimizer step
            model(batch)
            outputs.append(model.teacher([crop_major(batch["globals"])]).float())
    assert torch.equal(model.center, torch.zeros(1, 64))  # nothing moves before the step ends
    model.after_optimizer_step(1)
    expected = 0.1 * torch.cat(outputs).mean(0, keepdim=True)
    assert torch.allclose(model.center, expected, atol=1e-6)
    model.after_optimizer_step(2)  # no forward since: nothing to average, the center stays
    assert torch.allclose(model.center, expected, atol=1e-6)


def test_schedules_follow_the_official_shapes() -> None:
    assert linear_warmup(0, start=0.04, end=0.07, warmup_steps=31) == pytest.approx(0.04)
    assert linear_warmup(15, start=0.04, end=0.07, warmup_steps=31) == pytest.approx(0.055)
    assert linear_warmup(30, start=0.04, end=0.07, warmup_steps=31) == pytest.approx(0.07)
    assert linear_warmup(500, start=0.04, end=0.07, warmup_steps=31) == pytest.approx(0.07)
    assert cosine(0, start=0.996, end=1.0, total_steps=100) == pytest.approx(0.996)
    assert cosine(50, start=0.996, end=1.0, total_steps=100) == pytest.approx(0.998)
    assert cosine(100, start=0.996, end=1.0, total_steps=100) == pytest.approx(1.0)
    cfg = OptimConfig(weight_decay=0.04, weight_decay_end=0.4)
    assert [round(weight_decay_at(s, cfg, 100), 6) for s in (0, 50, 100)] == [0.04, 0.22, 0.4]
    assert weight_decay_at(50, OptimConfig(weight_decay=0.05), 100) == 0.05

    model = tiny_dino(warmup_teacher_temp_steps=11, teacher_momentum=0.996)
    model.begin_step(5, 20)
    assert model.teacher_temp() == pytest.approx(0.055)
    assert model.teacher_momentum() == pytest.approx(cosine(5, start=0.996, end=1.0, total_steps=20))


def test_head_rows_are_unit_vectors_unless_their_norms_are_learned() -> None:
    head = DINOHead(8, 50, hidden_dim=16, bottleneck_dim=4)
    with torch.no_grad():
        head.last_layer.weight_v.mul_(torch.rand(50, 1) * 10)  # any scale of v: the rows stay unit vectors
    assert torch.allclose(head.last_layer.weight().norm(dim=1), torch.ones(50), atol=1e-6)
    assert head.last_layer.weight_g is None
    assert head(torch.randn(5, 8)).abs().max() <= 1.0 + 1e-5  # cosines of unit vectors
    learned = DINOHead(8, 50, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    assert learned.last_layer.weight_g.requires_grad and torch.equal(learned.last_layer.weight_g, torch.ones(50, 1))


def test_learned_positions_are_resampled_for_local_crops() -> None:
    encoder = ViTEncoder.from_config(TINY, pos_embed="learned", init="dino")
    assert encoder.pos_embed.requires_grad and encoder.pos_embed.shape == (1, 5, 192)
    assert encoder(torch.randn(2, 3, 16, 16)).shape == (2, 2, 192)  # 1x1 grid + cls
    assert encoder(torch.randn(2, 3, 48, 48)).shape == (2, 10, 192)
    fixed = ViTEncoder.from_config(TINY)
    with pytest.raises(ValueError, match="sin-cos"):
        fixed(torch.randn(1, 3, 16, 16))


def test_student_and_teacher_are_the_same_network_but_only_the_student_trains() -> None:
    model = tiny_dino()
    pairs = model.teacher_pairs()
    params = dict(model.named_parameters())
    assert len(pairs) == len(list(model.teacher.parameters())) == len(list(model.student.parameters()))
    assert all(params[t].shape == params[s].shape and not params[t].requires_grad for t, s in pairs)
    assert all(s.startswith("student.") for _, s in pairs)
    assert model.eval_encoder() is model.teacher.backbone


def test_param_groups_decay_tokens_and_freeze_the_last_layer() -> None:
    model = tiny_dino(freeze_last_layer_steps=3)
    groups = build_param_groups(model, OptimConfig(weight_decay=0.04, weight_decay_end=0.4))
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert groups[0]["name"] == "decay"  # group 0 follows the weight-decay schedule, as DINO's
    assert {"student.backbone.pos_embed", "student.backbone.cls_token"} <= by_name["decay"]  # official groups
    assert by_name["decay:student.head.last_layer."] == {"student.head.last_layer.weight_v"}
    assert not any(n.startswith("teacher.") for group in by_name.values() for n in group)
    for step, frozen in ((0, True), (2, True), (3, False)):
        lr, wd = apply_schedules(groups, step, OptimConfig(base_lr=1e-3, weight_decay=0.04, weight_decay_end=0.4,
                                                           global_batch_size=256, warmup_steps=1), 10)
        last = next(g for g in groups if g["name"].startswith("decay:"))
        assert (last["lr"], last["weight_decay"]) == ((0.0, 0.0) if frozen else (lr, wd)), step


def test_config_rejects_local_crops_that_do_not_fit_the_patches() -> None:
    from largessl.errors import ConfigError

    with pytest.raises(ConfigError, match="objective.local_crop_size"):
        DINOConfig(local_crop_size=40).validate_with_model(TINY)
    with pytest.raises(ConfigError, match="objective.teacher_momentum"):
        DINOConfig(teacher_momentum=1.5).validate()
