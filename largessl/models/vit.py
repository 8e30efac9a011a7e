"""The ViT encoder every objective shares, assembled from timm's PatchEmbed and Block.

It runs on all patches or on a subset of them (masked objectives), with fused SDPA attention (timm picks
F.scaled_dot_product_attention) and optional non-reentrant activation checkpointing per block. Position
embeddings are fixed 2-D sin-cos as MAE uses them, or learned as in DINO; learned ones are resampled
bicubically (timm's resample_abs_pos_embed) for inputs of another size, such as DINO's 96-px local crops.

References: https://github.com/facebookresearch/mae/blob/main/models_mae.py (encoder, MAE init),
https://github.com/facebookresearch/dino/blob/main/vision_transformer.py (learned positions, DINO init)
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from largessl.models.config import ModelConfig
from largessl.models.pos_embed import sincos_2d

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """Apply blocks in order; with checkpointing, keep only block inputs and recompute in backward."""
    for block in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)  # non-reentrant: works with multi-view forwards
        else:
            x = block(x)
    return x


def build_blocks(dim: int, depth: int, heads: int, drop_path_rate: float = 0.0) -> nn.ModuleList:
    """Pre-norm blocks: qkv bias, LayerNorm eps 1e-6, GELU MLP x4, linearly increasing drop path."""
    rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=LayerNorm, drop_path=rate) for rate in rates
    )


@torch.no_grad()
def init_mae_style(module: nn.Module) -> None:
    """MAE init of one module's own parameters, for use with `Module.apply`.

    xavier-uniform Linear weights (the fused qkv as one matrix) and zero biases; the patch projection
    xavier-uniform as a Linear over flattened patches; LayerNorm (1, 0); `*_token` parameters N(0, 0.02).
    Touching only a module's own parameters lets DeepSpeed's zero.Init gather them one module at a time.
    """
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)  # MAE leaves the patch projection's bias at PyTorch's default
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    for name, param in module.named_parameters(recurse=False):
        if name.endswith("_token"):
            nn.init.normal_(param, std=0.02)


@torch.no_grad()
def init_dino_style(module: nn.Module) -> None:
    """DINO init of one module's own parameters: trunc-normal(0.02) Linear weights, zero biases, LayerNorm
    (1, 0), trunc-normal(0.02) `*_token` and learned `pos_embed`; the patch projection (a Conv2d) keeps
    PyTorch's default init, as in the official code."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    for name, param in module.named_parameters(recurse=False):
        if name.endswith("_token") or name == "pos_embed":
            trunc_normal_(param, std=0.02)


INITS = {"mae": init_mae_style, "dino": init_dino_style}


class ViTEncoder(nn.Module):
    """Patch embedding + [cls] + position embeddings + pre-norm blocks + final LayerNorm.

    Shapes: images [B, 3, H, W]; patch tokens [B, N, D] with N = (H/p)^2; keep_idx [B, K] patch indices.
    `pos_embed` is "sincos" (fixed, MAE) or "learned" (DINO); `init` is "mae" or "dino".
    """

    def __init__(self, *, image_size: int, patch_size: int, dim: int, depth: int, heads: int,
                 drop_path_rate: float = 0.0, grad_checkpointing: bool = False, pos_embed: str = "sincos",
                 init: str = "mae") -> None:
        super().__init__()
        self.dim, self.patch_size = dim, patch_size
        # Not strict about the input size: learned positions are resampled for other sizes (local crops).
        self.patch_embed = PatchEmbed(image_size, patch_size, 3, dim, strict_img_size=False)
        self.grid_size = image_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.learned_pos_embed = pos_embed == "learned"
        if self.learned_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size**2, dim))
        else:  # a fixed table, rebuilt from the grid on load, so it is not part of the state dict
            self.register_buffer("pos_embed", sincos_2d(dim, self.grid_size)[None], persistent=False)
        self.blocks = build_blocks(dim, depth, heads, drop_path_rate)
        self.norm = LayerNorm(dim)
        self.grad_checkpointing = grad_checkpointing
        self.apply(INITS[init])

    @classmethod
    def from_config(cls, cfg: ModelConfig, **overrides) -> ViTEncoder:
        dim, depth, heads = cfg.dims
        kwargs = dict(image_size=cfg.image_size, patch_size=cfg.patch_size, dim=dim, depth=depth, heads=heads,
                      drop_path_rate=cfg.drop_path_rate, grad_checkpointing=cfg.grad_checkpointing)
        return cls(**{**kwargs, **overrides})

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """[1, 1 + gh*gw, D] position embeddings ([cls] first) for a patch grid, resampled when it is not ours."""
        if grid == (self.grid_size, self.grid_size):
            return self.pos_embed
        if not self.learned_pos_embed:
            raise ValueError(f"fixed sin-cos positions are built for a {self.grid_size}x{self.grid_size} grid, "
                             f"not {grid[0]}x{grid[1]}")
        return resample_abs_pos_embed(self.pos_embed, new_size=list(grid), old_size=[self.grid_size] * 2,
                                      num_prefix_tokens=1, interpolation="bicubic", antialias=False)

    def embed_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] -> ([B, N, D] patch tokens with their position embeddings, [1, 1, D] [cls] position)."""
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        positions = self.positions(grid)
        return self.patch_embed(images) + positions[:, 1:].to(images.dtype), positions[:, :1]

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Encode all patches, or only patches `keep_idx` [B, K]; returns [B, 1 + K, D] after the final norm."""
        x, cls_position = self.embed_patches(images)
        if keep_idx is not None:
            x = torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + cls_position.to(self.cls_token.dtype)).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x)

    def forward_cls(self, images: torch.Tensor) -> torch.Tensor:
        """[B, D]: the [cls] output after the final norm (the feature k-NN and linear probes read).

        Goes through __call__ so that ZeRO-3 gathers this module's own parameters (cls_token, pos_embed)."""
        return self(images)[:, 0]
