"""MAE against methods.md section 2: masking, patch order, loss; plus parameter groups and schedules."""

from __future__ import annotations

import math

import pytest
import torch

from largessl.models.config import ModelConfig
from largessl.objectives.mae import MAE, MAEConfig, patchify, random_masking
from largessl.optim.config import OptimConfig
from largessl.optim.param_groups import build_param_groups
from largessl.optim.schedules import warmup_cosine


def test_masking_invariants() -> None:
    torch.manual_seed(0)
    noise = torch.rand(4, 196)
    keep = int(196 * (1 - 0.75))
    ids_keep, ids_restore, mask = random_masking(noise, keep)
    assert keep == 49 and ids_keep.shape == (4, 49)
    assert (mask.sum(dim=1) == 196 - 49).all()  # exactly N - keep masked, per sample
    for b in range(4):
        smallest = set(noise[b].argsort()[:keep].tolist())
        assert set(ids_keep[b].tolist()) == smallest  # the smallest noise values stay visible
        assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == smallest  # mask is in patch order
    shuffle = noise.argsort(dim=1)
    assert torch.equal(torch.gather(shuffle, 1, ids_restore), torch.arange(196).expand(4, -1))
    again = random_masking(noise.clone(), keep)
    assert all(torch.equal(a, b) for a, b in zip(again, (ids_keep, ids_restore, mask), strict=True))
    assert not torch.equal(ids_keep[0], ids_keep[1])  # per-sample masks


def test_patchify_order_is_row_column_channel() -> None:
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    b, gy, gx, y, x, c = 1, 1, 2, 3, 1, 2
    assert patches[b, gy * 3 + gx, (y * 4 + x) * 3 + c] == images[b, c, gy * 4 + y, gx * 4 + x]


def reference_mae_loss(model: MAE, images: torch.Tensor, noise: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """MAE's loss written plainly, one sample and one patch at a time, from the model's own weights."""
    enc, dec, p = model.encoder, model.decoder, model.encoder.patch_size
    grid = enc.grid_size
    losses, count = [], 0
    for b in range(images.shape[0]):
        visible = sorted(range(grid * grid), key=lambda i: noise[b, i].item())[:model.num_keep]
        tokens = [enc.cls_token[0, 0]]
        for i in visible:
            row, col = divmod(i, grid)
            patch = images[b:b + 1, :, row * p:(row + 1) * p, col * p:(col + 1) * p]
            tokens.append(enc.patch_embed.proj(patch).flatten() + enc.pos_embed[0, 1 + i])
        x = torch.stack(tokens)[None]
        for block in enc.blocks:
            x = block(x)
        latent = dec.embed(enc.norm(x))[0]
        sequence = [latent[0]] + [None] * (grid * grid)
        for slot, i in enumerate(visible):
            sequence[1 + i] = latent[1 + slot]
        y = torch.stack([t if t is not None else dec.mask_token[0, 0] for t in sequence])[None] + dec.pos_embed
        for block in dec.blocks:
            y = block(y)
        pred = dec.pred(dec.norm(y))[0, 1:]
        for i in range(grid * grid):
            if i in visible:
                continue
            row, col = divmod(i, grid)
            target = images[b, :, row * p:(row + 1) * p, col * p:(col + 1) * p].permute(1, 2, 0).reshape(-1)
            if norm_pix:
                mean, var = target.mean(), ((target - target.mean()) ** 2).sum() / (target.numel() - 1)
                target = (target - mean) / math.sqrt(var + 1e-6)
            losses.append(((pred[i] - target) ** 2).mean())
            count += 1
    return torch.stack(losses).sum() / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_a_straightforward_computation(norm_pix: bool) -> None:
    torch.manual_seed(0)
    cfg = MAEConfig(decoder_dim=32, decoder_depth=2, decoder_heads=4, norm_pix_loss=norm_pix)
    model = MAE(cfg, ModelConfig(name="vit_tiny_patch16", image_size=64)).eval()
    images, noise = torch.randn(3, 3, 64, 64), torch.rand(3, 16)
    with torch.no_grad():
        ours = model({"image": images, "mask_noise": noise})["loss"]
        reference = reference_mae_loss(model, images, noise, norm_pix)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


def test_gradients_reach_every_trainable_parameter() -> None:
    model = MAE(MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4), ModelConfig("vit_tiny_patch16", 32))
    loss = model({"image": torch.randn(2, 3, 32, 32), "mask_noise": torch.rand(2, 4)})["loss"]
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert {name for name, _ in model.named_buffers()} == {"encoder.pos_embed", "decoder.pos_embed"}


def test_weight_decay_groups() -> None:
    model = MAE(MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4), ModelConfig("vit_tiny_patch16", 32))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in build_param_groups(model, OptimConfig())}
    assert {"encoder.cls_token", "decoder.mask_token", "encoder.norm.weight", "encoder.blocks.0.attn.qkv.bias",
            "decoder.pred.bias"} <= groups["no_decay"]
    assert {"encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight", "decoder.pred.weight"} <= \
        groups["decay"]
    assert groups["decay"].isdisjoint(groups["no_decay"])
    assert len(groups["decay"]) + len(groups["no_decay"]) == len(names)
    official = {g["name"]: {names[id(p)] for p in g["params"]}
                for g in build_param_groups(model, OptimConfig(wd_on_tokens=True))}
    assert {"encoder.cls_token", "decoder.mask_token"} <= official["decay"]


def test_warmup_then_cosine() -> None:
    kwargs = {"peak": 1.0, "final": 0.1, "warmup_steps": 10, "total_steps": 110}
    assert warmup_cosine(0, **kwargs) == 0.0
    assert warmup_cosine(5, **kwargs) == pytest.approx(0.5)
    assert warmup_cosine(10, **kwargs) == pytest.approx(1.0)
    assert warmup_cosine(60, **kwargs) == pytest.approx(0.55)
    assert warmup_cosine(110, **kwargs) == pytest.approx(0.1)
    assert OptimConfig(base_lr=1.5e-4, global_batch_size=4096).peak_lr() == pytest.approx(2.4e-3)
