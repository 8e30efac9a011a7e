"""CAE: context autoencoder (methods.md section 4).

Stages as in the paper: a block-wise mask of exactly M patches (made in the data pipeline) -> the encoder on
[cls] + the visible patches -> the latent contextual regressor predicts the latents of the masked patches by
cross-attention (mask-token queries; the visible latents are keys and values and are never updated) -> the
decoder maps the predicted latents, at the masked positions only, to the target. Two losses:

    loss = main(decoder output, target of the masked patches) + align_weight x MSE(predicted latents, z)

where z is the encoder's own output for [cls] + the masked patches, computed under no_grad ([cls] dropped). The
official code keeps a second encoder for z and sets it to the encoder's weights before every step (momentum 0),
which is the same function; we call the one encoder again, so nothing extra is stored or partitioned at ZeRO-3.
Its drop path is active for z as in the official code (the alignment encoder is in train mode), switchable by
objective.target_drop_path. Targets: normalised pixels (MSE), or DALL-E dVAE token ids (cross-entropy over the
tokenizer's vocabulary, plus mlm_acc).

Deviations from the official code (also in docs/design-notes.md):
- one encoder called twice instead of an encoder and a momentum-0 copy (same values, half the parameters);
- the pixel target: the official v1 training loop has only tokenizer targets; ours is the paper's RGB ablation
  with MAE's per-patch normalisation;
- attention through F.scaled_dot_product_attention (the same softmax(q k^T / sqrt(d)) v, fused).

Reference: https://github.com/Atten4Vis/CAE/blob/master/models/modeling_cae.py (ContextAutoencoderViT),
models/modeling_cae_helper.py (encoder, LatentRegresser, Decoder), furnace/engine_for_pretraining.py (loss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from largessl.data.gpu_decode import CAEEncodedTransform, DeviceViews
from largessl.data.transforms import cae_pretrain_transform
from largessl.models import flops
from largessl.models.config import ModelConfig
from largessl.models.cross_attention import RegressorBlock
from largessl.models.dalle_tokenizer import DalleTokenizer
from largessl.models.flops import Flops
from largessl.models.pos_embed import sincos_2d
from largessl.models.vit import (
    LayerNorm,
    ViTEncoder,
    build_blocks,
    drop_path_rates,
    init_cae_style,
    rescale_residual_branches,
    run_blocks,
)
from largessl.objectives.base import Objective, SampleTransform
from largessl.objectives.config import CAEConfig
from largessl.objectives.mae import normalize_patches, patchify

TOKENIZER_PATCH = 8  # the DALL-E dVAE downsamples by 8: one token per 8 x 8 pixels of its input


def split_by_mask(mask: torch.Tensor, num_masked: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mask [B, N] (True = masked, exactly `num_masked` per row) -> (visible [B, N - M], masked [B, M]) patch
    indices, each in patch order (what the official boolean indexing gives)."""
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    return order[:, : mask.shape[1] - num_masked], order[:, mask.shape[1] - num_masked:]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] (or [1, N, D]) at indices idx [B, K] -> [B, K, D]."""
    return torch.gather(x.expand(idx.shape[0], -1, -1), 1, idx[..., None].expand(-1, -1, x.shape[-1]))


@torch.no_grad()
def init_xavier_linear(module: nn.Module) -> None:
    """The official top-level re-init (unless fix_init_weight): xavier-uniform for every Linear, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class LatentRegressor(nn.Module):
    """Predicts the latents of the masked patches from the visible ones (mask-token queries + positions)."""

    def __init__(self, dim: int, depth: int, heads: int, *, drop_path_rate: float, layer_scale: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(RegressorBlock(dim, heads, drop_path=rate, layer_scale=layer_scale)
                                    for rate in drop_path_rates(drop_path_rate, depth))
        self.norm = LayerNorm(dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.apply(init_cae_style)
        rescale_residual_branches(self.blocks, ("cross_attn.proj", "mlp.fc2"))

    def forward(self, visible: torch.Tensor, pos_visible: torch.Tensor, pos_masked: torch.Tensor) -> torch.Tensor:
        """visible latents [B, V, D], their positions [B, V, D], masked positions [B, M, D] -> [B, M, D]."""
        queries = self.mask_token.to(visible.dtype).expand(pos_masked.shape[0], pos_masked.shape[1], -1)
        pos_kv = torch.cat([pos_visible, pos_masked], dim=1)
        for block in self.blocks:
            queries = block(queries, torch.cat([visible, queries], dim=1), pos_masked, pos_kv)
        return self.norm(queries)


class CAEDecoder(nn.Module):
    """BEiT blocks over the masked positions only (predicted latents + positions), LayerNorm, linear head."""

    def __init__(self, dim: int, depth: int, heads: int, out_dim: int, *, drop_path_rate: float,
                 layer_scale: float, grad_checkpointing: bool) -> None:
        super().__init__()
        self.blocks = build_blocks(dim, depth, heads, drop_path_rate, layer_scale)
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)
        self.grad_checkpointing = grad_checkpointing
        self.apply(init_cae_style)
        rescale_residual_branches(self.blocks)

    def forward(self, latents: torch.Tensor, pos_masked: torch.Tensor) -> torch.Tensor:
        x = run_blocks(self.blocks, latents + pos_masked, self.grad_checkpointing)
        return self.head(self.norm(x))


class CAE(Objective):
    name = "cae"
    Config = CAEConfig

    def __init__(self, cfg: CAEConfig, model_cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg, self.num_masked = cfg, cfg.masked_count(model_cfg)
        self.encoder = ViTEncoder.from_config(model_cfg, **self.encoder_layout(cfg))
        dim, heads = cfg.widths(model_cfg)
        self.project = None if dim == self.encoder.dim else nn.Sequential(nn.Linear(self.encoder.dim, dim),
                                                                           LayerNorm(dim))
        table = sincos_2d(dim, self.encoder.grid_size, cls_token=False, rows_first=True)
        self.register_buffer("pos_embed", table[None], persistent=False)  # regressor and decoder positions
        drop = model_cfg.drop_path_rate
        self.regressor = LatentRegressor(dim, cfg.regressor_depth, heads, drop_path_rate=drop,
                                         layer_scale=cfg.decoder_layer_scale)
        self.tokenizer = self._tokenizer(cfg)
        out_dim = self.tokenizer.vocab_size if self.tokenizer else self.encoder.patch_size ** 2 * 3
        self.decoder = CAEDecoder(dim, cfg.decoder_depth, heads, out_dim, drop_path_rate=drop,
                                  layer_scale=cfg.decoder_layer_scale, grad_checkpointing=model_cfg.grad_checkpointing)
        if not cfg.fix_init_weight:
            self.apply(init_xavier_linear)

    @classmethod
    def encoder_layout(cls, cfg: CAEConfig) -> dict[str, Any]:
        return {"pos_embed": "sincos_rows_first", "init": "cae", "layer_scale": cfg.layer_scale}

    @staticmethod
    def _tokenizer(cfg: CAEConfig) -> DalleTokenizer | None:
        return DalleTokenizer(cfg.tokenizer_path) if cfg.target == "dalle" else None

    @classmethod
    def sample_transform(cls, cfg: CAEConfig, model_cfg: ModelConfig) -> SampleTransform:
        grid = model_cfg.image_size // model_cfg.patch_size
        return cae_pretrain_transform(model_cfg.image_size, grid, cfg.masked_count(model_cfg), cfg.crop_scale,
                                      tokenizer_size=grid * TOKENIZER_PATCH if cfg.target == "dalle" else 0,
                                      min_num_patches=cfg.min_block_patches)

    @classmethod
    def encoded_views(cls, cfg: CAEConfig, model_cfg: ModelConfig) -> tuple[Callable, Callable]:
        grid = model_cfg.image_size // model_cfg.patch_size
        tokenizer_size = grid * TOKENIZER_PATCH if cfg.target == "dalle" else 0
        return (CAEEncodedTransform(grid, cfg.masked_count(model_cfg), cfg.crop_scale,
                                    min_num_patches=cfg.min_block_patches),
                DeviceViews(model_cfg.image_size, tokenizer_size))

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"regressor.mask_token"}

    def flops_per_image(self) -> Flops:
        """Encoder on the visible tokens, regressor (masked queries on visible + masked keys), decoder on the
        masked ones; without gradients the alignment pass on the masked tokens and the DALL-E tokenizer."""
        masked, visible = self.num_masked, self.encoder.num_patches - self.num_masked
        project = flops.per_token(self.project) if self.project is not None else 0.0
        width = self.pos_embed.shape[-1]
        regressor = sum(flops.cross_block(masked, visible + masked, width) for _ in self.regressor.blocks)
        decoder = flops.blocks(self.decoder.blocks, masked) + flops.per_token(self.decoder.head) * masked
        trained = flops.encoder(self.encoder, visible + 1) + project * visible + regressor + decoder
        no_grad = flops.encoder(self.encoder, masked + 1) + project * masked
        if self.tokenizer is not None:
            no_grad += self.tokenizer.flops(self.encoder.grid_size * TOKENIZER_PATCH)
        return Flops(trained, no_grad)

    def latents(self, images: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(visible latents [B, V, Dd], alignment targets [B, M, Dd] under no_grad) from one encoder."""
        encoded = self.encoder(images, keep_idx=visible)[:, 1:]
        was_training = self.encoder.training
        with torch.no_grad():
            self.encoder.train(was_training and self.cfg.target_drop_path)
            targets = self.encoder(images, keep_idx=masked)[:, 1:]
            self.encoder.train(was_training)
            if self.project is not None:
                targets = self.project(targets)
        return (encoded if self.project is None else self.project(encoded)), targets

    def main_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor],
                  masked: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reconstruction term on the masked patches, in fp32 (and mlm_acc for tokens)."""
        if self.tokenizer is None:
            target = gather_tokens(patchify(batch["image"].float(), self.encoder.patch_size), masked)
            if self.cfg.norm_pix_loss:
                target = normalize_patches(target)
            return {"loss_main": F.mse_loss(logits.float(), target)}
        labels = torch.gather(self.tokenizer.token_ids(batch["tokenizer_image"]), 1, masked)
        flat = logits.float().flatten(0, 1)
        return {"loss_main": F.cross_entropy(flat, labels.flatten()),
                "mlm_acc": (flat.argmax(-1) == labels.flatten()).float().mean().detach()}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["image"].to(self.compute_dtype())
        visible, masked = split_by_mask(batch["mask"], self.num_masked)
        encoded, targets = self.latents(images, visible, masked)
        pos = self.pos_embed.to(encoded.dtype)
        pos_masked = gather_tokens(pos, masked)
        predicted = self.regressor(encoded, gather_tokens(pos, visible), pos_masked)
        terms = self.main_loss(self.decoder(predicted, pos_masked), batch, masked)
        terms["loss_align"] = F.mse_loss(predicted.float(), targets.float())
        loss = terms["loss_main"] + self.cfg.align_weight * terms["loss_align"]
        return {"loss": loss, **{key: value.detach() for key, value in terms.items()}}
