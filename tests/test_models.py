"""The ViT encoder: sizes, position embeddings, visible-subset forward, checkpointing, fused attention."""

from __future__ import annotations

import math

import pytest
import torch

from largessl.models.config import ModelConfig
from largessl.models.pos_embed import sincos_2d
from largessl.models.vit import ViTEncoder


@pytest.mark.parametrize(("name", "millions"), [
    ("vit_tiny_patch16", 5.5), ("vit_small_patch16", 21.7), ("vit_base_patch16", 85.8),
    ("vit_large_patch16", 303.3), ("vit_huge_patch14", 630.8),
])
def test_named_sizes_match_the_papers(name: str, millions: float) -> None:
    with torch.device("meta"):  # no memory: ViT-H has 632M parameters
        encoder = ViTEncoder.from_config(ModelConfig(name=name))
    count = sum(p.numel() for p in encoder.parameters()) / 1e6
    assert count == pytest.approx(millions, rel=0.01)


def test_sincos_layout_is_maes() -> None:
    dim, grid = 16, 4
    table = sincos_2d(dim, grid)
    assert table.shape == (1 + grid * grid, dim) and not table[0].any()  # zero [cls] row
    omega = [1.0 / 10000 ** (k / (dim / 4)) for k in range(dim // 4)]
    r, c = 2, 3  # patch at row 2, column 3
    expected = ([math.sin(c * w) for w in omega] + [math.cos(c * w) for w in omega]
                + [math.sin(r * w) for w in omega] + [math.cos(r * w) for w in omega])
    assert table[1 + r * grid + c].tolist() == pytest.approx(expected, abs=1e-6)


def tiny(**kwargs) -> ViTEncoder:
    torch.manual_seed(0)
    return ViTEncoder(image_size=32, patch_size=8, dim=32, depth=2, heads=2, **kwargs).eval()


def test_visible_subset_forward() -> None:
    encoder = tiny()
    images = torch.randn(2, 3, 32, 32)
    everything = encoder(images)
    assert everything.shape == (2, 17, 32)
    identity = torch.arange(16).expand(2, 16)
    assert torch.allclose(encoder(images, identity), everything, atol=1e-6)
    # Positions are added before the subset is taken, so permuting the kept patches permutes the outputs.
    perm = torch.randperm(16)[:5].expand(2, 5)
    subset = encoder(images, perm)
    assert subset.shape == (2, 6, 32)
    reordered = encoder(images, perm.flip(1))
    assert torch.allclose(reordered[:, 1:], subset[:, 1:].flip(1), atol=1e-5)
    assert torch.allclose(reordered[:, 0], subset[:, 0], atol=1e-5)


def test_grad_checkpointing_changes_nothing_but_memory() -> None:
    images = torch.randn(2, 3, 32, 32)
    plain, ckpt = tiny().train(), tiny(grad_checkpointing=True).train()
    out_plain, out_ckpt = plain(images).square().sum(), ckpt(images).square().sum()
    out_plain.backward()
    out_ckpt.backward()
    assert torch.allclose(out_plain, out_ckpt)
    for p, q in zip(plain.parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_attention_uses_fused_sdpa() -> None:
    assert all(block.attn.fused_attn for block in tiny().blocks)


def test_mae_initialisation() -> None:
    encoder = ViTEncoder.from_config(ModelConfig(name="vit_small_patch16"))
    qkv = encoder.blocks[0].attn.qkv.weight  # xavier-uniform over the fused (3D x D) matrix
    bound = math.sqrt(6 / (qkv.shape[0] + qkv.shape[1]))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert not encoder.blocks[0].attn.qkv.bias.any()
    assert encoder.cls_token.std().item() == pytest.approx(0.02, rel=0.2)
    assert "pos_embed" not in dict(encoder.named_parameters())  # fixed, not learned
