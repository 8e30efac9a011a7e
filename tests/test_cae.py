"""CAE (methods.md 4): the regressor's cross-attention and the alignment targets against straightforward
computations on the same weights, losses with known answers, the config's mask count, the official init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from largessl.config.load import load_config
from largessl.errors import ConfigError
from largessl.models.config import ModelConfig
from largessl.models.cross_attention import RegressorBlock
from largessl.objectives.cae import CAE, split_by_mask
from largessl.objectives.config import CAEConfig

TINY = ModelConfig(name="vit_tiny_patch16", image_size=64)  # 16 patches


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def reference_regressor_block(block: RegressorBlock, q: torch.Tensor, kv: torch.Tensor, pos_q: torch.Tensor,
                              pos_kv: torch.Tensor) -> torch.Tensor:
    """methods.md 4.1 written out: per-head softmax(q k^T / sqrt(d)) v with q, v biases and no k bias."""
    attn = block.cross_attn
    heads = attn.heads
    qq = layer_norm(q + pos_q, block.norm1_q) @ attn.q.weight.T + attn.q_bias
    kk = layer_norm(kv + pos_kv, block.norm1_k) @ attn.k.weight.T
    vv = layer_norm(kv, block.norm1_v) @ attn.v.weight.T + attn.v_bias
    b, nq, d = qq.shape
    split = [t.reshape(b, t.shape[1], heads, d // heads).permute(0, 2, 1, 3) for t in (qq, kk, vv)]
    weights = torch.softmax(split[0] @ split[1].transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    out = (weights @ split[2]).permute(0, 2, 1, 3).reshape(b, nq, d) @ attn.proj.weight.T + attn.proj.bias
    x = layer_norm(q + block.gamma_1 * out, block.norm2)
    hidden = F.gelu(x @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
    return x + block.gamma_2 * (hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias)


def test_regressor_block_matches_a_straightforward_computation() -> None:
    torch.manual_seed(0)
    block = RegressorBlock(32, 4, layer_scale=0.5).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.3)
    q, pos_q = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    kv, pos_kv = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    torch.testing.assert_close(block(q, kv, pos_q, pos_kv), reference_regressor_block(block, q, kv, pos_q, pos_kv),
                               rtol=1e-4, atol=1e-5)


def test_the_regressor_never_updates_the_visible_latents() -> None:
    """Keys and values are the visible latents (unchanged) plus the current queries: a visible latent's gradient
    comes only through attention, and the output has one row per masked position."""
    torch.manual_seed(0)
    model = CAE(CAEConfig(num_masked=6, decoder_depth=1, regressor_depth=2), TINY).eval()
    visible = torch.randn(2, 10, model.encoder.dim)
    pos = torch.randn(2, 10, model.encoder.dim), torch.randn(2, 6, model.encoder.dim)
    before = visible.clone()
    out = model.regressor(visible, *pos)
    assert out.shape == (2, 6, model.encoder.dim) and torch.equal(visible, before)


def batch_for(model: CAE, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, TINY.image_size, TINY.image_size, generator=generator)
    n = TINY.num_patches
    mask = torch.zeros(2, n, dtype=torch.bool)
    for row in range(2):
        mask[row, torch.randperm(n, generator=generator)[: model.num_masked]] = True
    return {"image": images, "mask": mask}


def test_split_by_mask_keeps_patch_order() -> None:
    mask = torch.tensor([[False, True, False, True, True, False], [True, False, False, False, True, True]])
    visible, masked = split_by_mask(mask, 3)
    assert visible.tolist() == [[0, 2, 5], [1, 2, 3]] and masked.tolist() == [[1, 3, 4], [0, 4, 5]]


def test_alignment_targets_are_the_encoders_own_latents_without_gradient() -> None:
    torch.manual_seed(0)
    model = CAE(CAEConfig(num_masked=8, target_drop_path=False), TINY)
    batch = batch_for(model)
    visible, masked = split_by_mask(batch["mask"], model.num_masked)
    encoded, targets = model.latents(batch["image"], visible, masked)
    assert targets.grad_fn is None and not targets.requires_grad and encoded.requires_grad
    model.eval()
    with torch.no_grad():
        expected = model.encoder(batch["image"], keep_idx=masked)[:, 1:]
        assert torch.allclose(targets, expected, atol=1e-6)  # the same weights, the masked patches, [cls] dropped
        assert torch.allclose(encoded, model.encoder(batch["image"], keep_idx=visible)[:, 1:], atol=1e-6)


def test_targets_use_drop_path_as_the_official_code_unless_switched_off() -> None:
    cfg = ModelConfig(name="vit_tiny_patch16", image_size=64, drop_path_rate=0.5)
    for drop_path, differ in ((True, True), (False, False)):
        torch.manual_seed(0)
        model = CAE(CAEConfig(num_masked=8, target_drop_path=drop_path), cfg).train()
        batch = batch_for(model)
        visible, masked = split_by_mask(batch["mask"], model.num_masked)
        first = model.latents(batch["image"], visible, masked)[1]
        second = model.latents(batch["image"], visible, masked)[1]
        assert (not torch.allclose(first, second)) == differ
        assert model.encoder.training  # restored after the no_grad pass


def test_losses_with_known_answers_pixels() -> None:
    """Zero decoder head: the pixel loss is the mean square of the normalised targets, (d - 1) / d x var /
    (var + 1e-6) per patch; constant predicted latents b against constant targets c: the alignment is (b - c)^2."""
    torch.manual_seed(0)
    model = CAE(CAEConfig(num_masked=8, target_drop_path=False), TINY).eval()
    with torch.no_grad():
        model.decoder.head.weight.zero_()
        model.decoder.head.bias.zero_()
        model.regressor.norm.weight.zero_()
        model.regressor.norm.bias.fill_(0.75)
        model.encoder.norm.weight.zero_()
        model.encoder.norm.bias.fill_(-0.25)
    batch = batch_for(model)
    out = model(batch)
    patches = batch["image"].reshape(2, 3, 4, 16, 4, 16).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 768)
    _, masked = split_by_mask(batch["mask"], model.num_masked)
    chosen = torch.gather(patches, 1, masked[..., None].expand(-1, -1, 768))
    var = chosen.var(-1)
    expected_main = (767 / 768 * var / (var + 1e-6)).mean()
    torch.testing.assert_close(out["loss_main"], expected_main, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss_align"], torch.tensor(1.0))
    torch.testing.assert_close(out["loss"], expected_main + 2.0 * 1.0, rtol=1e-5, atol=1e-6)


def test_the_loss_trains_every_part_but_the_targets() -> None:
    torch.manual_seed(0)
    model = CAE(CAEConfig(num_masked=8), TINY).train()
    model(batch_for(model))["loss"].backward()
    no_grad = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_official_init_xavier_unless_fix_init_weight() -> None:
    torch.manual_seed(0)
    xavier = CAE(CAEConfig(num_masked=8), TINY)
    torch.manual_seed(0)
    beit = CAE(CAEConfig(num_masked=8, fix_init_weight=True), TINY)
    fc2 = [block.mlp.fc2.weight for block in beit.encoder.blocks]
    assert all(w.abs().max() <= 0.02 / math.sqrt(2 * (i + 1)) + 1e-7 for i, w in enumerate(fc2))  # cut at 1 sigma
    bound = math.sqrt(6 / (192 * 4 + 192))  # xavier-uniform of a 192 -> 768 Linear
    w = xavier.encoder.blocks[0].mlp.fc1.weight
    assert 0.9 * bound < w.abs().max() <= bound
    assert xavier.encoder.blocks[0].gamma_1.eq(0.1).all() and beit.regressor.blocks[0].gamma_1.eq(0.1).all()
    assert xavier.encoder.blocks[0].attn.k_bias.eq(0).all()


def test_mask_count_defaults_to_half_and_is_checked() -> None:
    assert CAEConfig().masked_count(ModelConfig(name="vit_base_patch16")) == 98
    assert CAEConfig().masked_count(ModelConfig(name="vit_huge_patch14")) == 128
    for bad in ("objective.num_masked=196", "objective.num_masked=-1"):
        with pytest.raises(ConfigError, match="objective.num_masked"):
            load_config("pretrain/cae_vitb16", [bad])
    with pytest.raises(ConfigError, match="objective.tokenizer_path: is required for objective.target=dalle"):
        load_config("debug/cae_vit_tiny", ["objective.target=dalle"])


def test_shipped_cae_recipes_carry_the_reference_settings() -> None:
    vitb = load_config("pretrain/cae_vitb16")
    assert (vitb.optim.global_batch_size, vitb.optim.peak_lr(), vitb.optim.betas) == (2048, 1.5e-3, (0.9, 0.999))
    assert (vitb.objective.num_masked, vitb.optim.grad_clip, vitb.model.drop_path_rate) == (98, 3.0, 0.1)
    vitl = load_config("pretrain/cae_vitl16")
    assert (vitl.objective.decoder_dim, vitl.objective.decoder_heads, vitl.objective.fix_init_weight) == (1024, 16,
                                                                                                           True)
    assert vitl.objective.layer_scale == 1e-5
    vith = load_config("pretrain/cae_vith14")
    assert (vith.objective.num_masked, vith.model.num_patches, vith.distributed.zero_stage) == (128, 256, 3)


def test_mean_pooled_features_for_knn() -> None:
    torch.manual_seed(0)
    encoder = CAE(CAEConfig(num_masked=8), TINY).eval().encoder
    images = torch.randn(3, 3, TINY.image_size, TINY.image_size)
    with torch.no_grad():
        tokens = encoder(images)
        assert torch.equal(encoder.forward_pooled(images, "cls"), tokens[:, 0])
        torch.testing.assert_close(encoder.forward_pooled(images, "mean"), tokens[:, 1:].mean(1))
    with pytest.raises(ConfigError, match="eval.knn_pool: must be one of cls, mean"):
        load_config("debug/cae_vit_tiny", ["eval.knn_pool=max"])


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised DALL-E dVAE encoder (the real dall_e class, a small one), saved as encoder.pkl is."""
    dall_e = pytest.importorskip("dall_e", reason="needs the dall-e package (pip install 'largessl[dalle]')")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dalle") / "encoder.pkl"
    torch.save(dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512), path)
    return str(path)


def test_token_target_loss_with_a_known_answer(tokenizer_file: str) -> None:
    """A decoder head that outputs the same logits b everywhere (zero weights, bias 2 on token j, the first label):
    the cross-entropy is log(511 + e^2) - 2 [label == j] per masked patch and mlm_acc the share of labels equal
    to j; the labels are the tokenizer's ids of the masked patches."""
    torch.manual_seed(0)
    model = CAE(CAEConfig(num_masked=8, target="dalle", tokenizer_path=tokenizer_file), TINY).eval()
    assert model.decoder.head.out_features == 512 and "tokenizer" not in dict(model.named_children())
    batch = batch_for(model)
    batch["tokenizer_image"] = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _, masked = split_by_mask(batch["mask"], model.num_masked)
    labels = torch.gather(model.tokenizer.token_ids(batch["tokenizer_image"]), 1, masked)
    assert labels.shape == (2, 8)
    hit = labels == labels[0, 0]
    with torch.no_grad():
        model.decoder.head.weight.zero_()
        model.decoder.head.bias.zero_()
        model.decoder.head.bias[labels[0, 0]] = 2.0
    out = model(batch)
    expected = (math.log(511 + math.exp(2.0)) - 2.0 * hit.float()).mean()
    torch.testing.assert_close(out["loss_main"], expected)
    torch.testing.assert_close(out["mlm_acc"], hit.float().mean())
    assert 0 < out["mlm_acc"] <= 1 and not any("tokenizer" in name for name in model.state_dict())
