"""MAE: masked autoencoders reconstruct the pixels of randomly masked patches (methods.md section 2).

Stages as in the paper: random masking -> forward_encoder (visible patches only) -> forward_decoder
(mask tokens, un-shuffle, 8x512 transformer) -> forward_loss (MSE on masked patches, per-patch
normalised targets with norm_pix_loss).

Deviation from the official code: the per-sample masking noise is drawn in the data pipeline under a
per-sample seed (design.md: masks are a data concern), not on the GPU inside the model. The masking
itself (argsort of uniform noise, keep the smallest) is the same, and the run becomes independent of
world size, worker count and resume point.

References: https://github.com/facebookresearch/mae/blob/main/models_mae.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from largessl.data.gpu_decode import DeviceViews, MAEEncodedTransform
from largessl.data.transforms import mae_pretrain_transform
from largessl.models import flops
from largessl.models.config import ModelConfig
from largessl.models.flops import Flops
from largessl.models.pos_embed import sincos_2d
from largessl.models.vit import LayerNorm, ViTEncoder, build_blocks, init_mae_style, run_blocks
from largessl.objectives.base import Objective, SampleTransform
from largessl.objectives.config import MAEConfig, num_visible


def random_masking(noise: torch.Tensor, num_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking from uniform noise [B, N]: the num_keep smallest values stay visible.

    Returns ids_keep [B, K] (visible patch indices), ids_restore [B, N] (un-shuffles the kept-then-masked
    order back to patch order) and mask [B, N] (0 visible, 1 masked, in patch order).
    """
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    mask = torch.ones_like(noise)
    mask[:, :num_keep] = 0
    return ids_keep, ids_restore, torch.gather(mask, 1, ids_restore)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, N, p*p*3], each patch ordered (row in patch, column in patch, channel)."""
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    x = images.reshape(b, c, gh, patch_size, gw, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, gh * gw, patch_size * patch_size * c)


def normalize_patches(patches: torch.Tensor) -> torch.Tensor:
    """Each patch [..., p*p*3] to zero mean and unit variance (unbiased, eps 1e-6), as MAE's norm_pix_loss."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)  # unbiased, as in the official code
    return (patches - mean) / (var + 1e-6) ** 0.5


class MAEDecoder(nn.Module):
    """Lightweight decoder over all N + 1 tokens: embed, mask tokens, un-shuffle, blocks, pixel prediction."""

    def __init__(self, *, encoder_dim: int, dim: int, depth: int, heads: int, grid_size: int, patch_size: int,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, grid_size)[None], persistent=False)
        self.blocks = build_blocks(dim, depth, heads)
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * 3)
        self.grad_checkpointing = grad_checkpointing
        self.apply(init_mae_style)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1 + K, D_enc], ids_restore [B, N] -> pixel predictions [B, N, p*p*3]."""
        x = self.embed(latent)
        num_masked = ids_restore.shape[1] + 1 - x.shape[1]
        patches = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(x.shape[0], num_masked, -1)], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm(run_blocks(self.blocks, x, self.grad_checkpointing))
        return self.pred(x)[:, 1:]


class MAE(Objective):
    name = "mae"
    Config = MAEConfig

    def __init__(self, cfg: MAEConfig, model_cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = ViTEncoder.from_config(model_cfg, **self.encoder_layout(cfg))
        self.decoder = MAEDecoder(encoder_dim=self.encoder.dim, dim=cfg.decoder_dim, depth=cfg.decoder_depth,
                                  heads=cfg.decoder_heads, grid_size=self.encoder.grid_size,
                                  patch_size=self.encoder.patch_size, grad_checkpointing=model_cfg.grad_checkpointing)
        self.num_keep = num_visible(self.encoder.num_patches, cfg.mask_ratio)

    @classmethod
    def sample_transform(cls, cfg: MAEConfig, model_cfg: ModelConfig) -> SampleTransform:
        return mae_pretrain_transform(model_cfg.image_size, cfg.crop_scale, model_cfg.num_patches)

    def flops_per_image(self) -> Flops:
        """Encoder on the visible tokens and [cls] (every patch embedded), decoder on all N + 1."""
        tokens, visible = self.encoder.num_patches + 1, self.num_keep + 1
        decoder = (flops.per_token(self.decoder.embed) * visible + flops.blocks(self.decoder.blocks, tokens)
                   + flops.per_token(self.decoder.pred) * tokens)
        return Flops(trained=flops.encoder(self.encoder, visible) + decoder)

    @classmethod
    def encoded_views(cls, cfg: MAEConfig, model_cfg: ModelConfig) -> tuple[Callable, Callable]:
        return (MAEEncodedTransform(model_cfg.image_size, cfg.crop_scale, model_cfg.num_patches),
                DeviceViews(model_cfg.image_size))

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"decoder.mask_token", "decoder.pos_embed"}

    def forward_encoder(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> latent [B, 1 + K, D] of the visible patches."""
        return self.encoder(images.to(self.compute_dtype()), keep_idx=ids_keep)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent, ids_restore)

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches of the batch, in fp32."""
        target = patchify(images.float(), self.encoder.patch_size)
        if self.cfg.norm_pix_loss:
            target = normalize_patches(target)
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        ids_keep, ids_restore, mask = random_masking(batch["mask_noise"], self.num_keep)
        latent = self.forward_encoder(images, ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        return {"loss": self.forward_loss(images, pred, mask)}
