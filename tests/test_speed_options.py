"""The speed switches that stay off until a GPU measurement keeps them (docs/design-notes.md): `optim.fused`
(torch's fused AdamW) and `model.compile` (torch.compile of every transformer block). Each must leave training
unchanged: the same update, the same outputs and gradients, the same losses through the real DeepSpeed engine."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_largessl
from test_train import ok

from largessl.config.load import load_config
from largessl.errors import ConfigError
from largessl.models.vit import ViTEncoder, compile_blocks
from largessl.optim.build import make_optimizer
from largessl.optim.config import OptimConfig


def test_fused_adamw_makes_the_default_adamws_update() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(64, 32, requires_grad=True), torch.randn(32, requires_grad=True)]
    twins = [w.detach().clone().requires_grad_() for w in weights]
    optimizers = [make_optimizer([{"params": params, "lr": 1e-2, "weight_decay": 0.05}], OptimConfig(fused=fused))
                  for params, fused in ((weights, False), (twins, True))]
    assert optimizers[1].defaults["fused"] and not optimizers[0].defaults["fused"]
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for params, optimizer in zip((weights, twins), optimizers, strict=True):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            for group in optimizer.param_groups:
                group["lr"] = 1e-2
            optimizer.step()
    for a, b in zip(weights, twins, strict=True):
        assert (a - b).abs().max() < 1e-6


def test_compiled_blocks_give_the_same_outputs_gradients_and_state_dict() -> None:
    torch.manual_seed(1)
    plain = ViTEncoder(image_size=32, patch_size=8, dim=32, depth=3, heads=2)
    compiled = copy.deepcopy(plain)
    assert compile_blocks(compiled, backend="aot_eager") == 3  # dynamo + autograd tracing, without a C compiler
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints load either way
    images = torch.randn(4, 3, 32, 32)
    outs = [model(images) for model in (plain, compiled)]
    for out in outs:
        out.square().mean().backward()
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    grads = [model.blocks[0].attn.qkv.weight.grad for model in (plain, compiled)]
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-5)


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.compile=true", "distributed.zero_stage=3"], "model.compile: not with ZeRO-3"),
    (["optim.fused=true", "distributed.offload=true", "distributed.zero_stage=3"],
     "optim.fused: not with distributed.offload"),
    (["optim.fused=true", "optim.name=sgd"], "optim.fused: applies to adamw only"),
])
def test_switches_that_cannot_apply_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("debug/mae_vit_tiny", overrides)


@pytest.mark.slow  # ~3 min: three short trainings, one of them compiling with inductor
def test_training_with_the_switches_gives_the_same_losses(mini_shards: Path, tmp_path: Path) -> None:
    base = ["pretrain", "--config", "debug/mae_vit_tiny", f"data.train={mini_shards}", f"data.val={mini_shards}",
            "trainer.max_steps=3", "trainer.log_every=1", "eval.knn_every=0", "data.num_workers=1",
            "tracking.enabled=false", "distributed.precision=fp32", "distributed.zero_stage=2"]
    for name, switch in (("plain", "optim.fused=false"), ("fused", "optim.fused=true"),
                         ("compiled", "model.compile=true")):
        result = ok(run_largessl([*base, f"run.name={name}", switch], tmp_path, timeout=900))
    assert "transformer blocks compiled on first use" in result.stdout
    plain = read_metrics(tmp_path / "runs" / "plain")
    for name in ("fused", "compiled"):
        other = read_metrics(tmp_path / "runs" / name)
        assert sorted(other) == sorted(plain) == [1, 2, 3], name
        for step in plain:
            assert other[step]["loss"] == pytest.approx(plain[step]["loss"], rel=1e-4), (name, step)
