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
from timm.models.beit import Block as BEiTBlock
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


def compile_blocks(module: nn.Module, backend: str = "inductor") -> int:
    """torch.compile, in place, every transformer block in `module` (timm's and BEiT's Block; the parameter
    names and the state dict stay as they are); returns how many. Identical blocks share one compiled graph."""
    blocks = [m for m in module.modules() if isinstance(m, (Block, BEiTBlock))]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 at the first block to `drop_path_rate` at the last."""
    return [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]


def build_blocks(dim: int, depth: int, heads: int, drop_path_rate: float = 0.0,
                 layer_scale: float | None = None) -> nn.ModuleList:
    """Pre-norm blocks: qkv bias, LayerNorm eps 1e-6, GELU MLP x4, linearly increasing drop path.

    With `layer_scale`, BEiT's blocks as CAE uses them (timm's beit.Block): per-channel scales gamma_1, gamma_2
    initialised to `layer_scale` on both residual branches, and q and v biases with a fixed zero k bias."""
    rates = drop_path_rates(drop_path_rate, depth)
    if layer_scale is not None:
        blocks = nn.ModuleList(BEiTBlock(dim, heads, qkv_bias=True, mlp_ratio=4.0, drop_path=rate,
                                         init_values=layer_scale, norm_layer=LayerNorm) for rate in rates)
        for block in blocks:
            block.attn.register_forward_pre_hook(_k_bias_follows_q_bias)
        return blocks
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=LayerNorm, drop_path=rate) for rate in rates
    )


def _k_bias_follows_q_bias(attn: nn.Module, args: tuple) -> None:
    """timm's BEiT attention concatenates its fixed zero k bias, a buffer, with q_bias and v_bias. DeepSpeed casts
    parameters but not buffers to bf16/fp16 (below ZeRO-3), so keep the buffer in the parameters' dtype."""
    if attn.k_bias.dtype != attn.q_bias.dtype:
        attn.k_bias = attn.k_bias.to(attn.q_bias.dtype)


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


@torch.no_grad()
def init_cae_style(module: nn.Module) -> None:
    """CAE's (BEiT's) init of one module's own parameters: Linear and Conv2d weights trunc-normal(0.02) cut at
    +-1 sigma (the official helper passes a=-std, b=std), zero biases, LayerNorm (1, 0), `*_token` likewise
    trunc-normal; layer scales keep their init value. `rescale_residual_branches` completes it."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight, std=0.02, a=-0.02, b=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    for name, param in module.named_parameters(recurse=False):
        if name.endswith("_token"):
            trunc_normal_(param, std=0.02, a=-0.02, b=0.02)


@torch.no_grad()
def rescale_residual_branches(blocks: nn.ModuleList, branches: tuple[str, str] = ("attn.proj", "mlp.fc2")) -> None:
    """BEiT's rescale: the output projections of block l (1-based) divided by sqrt(2 l). Each Linear is touched
    through its own `apply`, so ZeRO-3's zero.Init gathers just that one."""
    for layer, block in enumerate(blocks, start=1):
        for branch in branches:
            block.get_submodule(branch).apply(lambda m, s=(2.0 * layer) ** 0.5: m.weight.div_(s))


INITS = {"mae": init_mae_style, "dino": init_dino_style, "cae": init_cae_style}


class ViTEncoder(nn.Module):
    """Patch embedding + [cls] + position embeddings + pre-norm blocks + final LayerNorm.

    Shapes: images [B, 3, H, W]; patch tokens [B, N, D] with N = (H/p)^2; keep_idx [B, K] patch indices.
    `pos_embed` is "sincos" (fixed, MAE's layout), "sincos_rows_first" (fixed, CAE's) or "learned" (DINO); `init`
    is "mae", "dino" or "cae"; `layer_scale` (CAE) makes the blocks BEiT's (see build_blocks); `final_norm=False`
    (SIM) leaves out the final LayerNorm.
    """

    def __init__(self, *, image_size: int, patch_size: int, dim: int, depth: int, heads: int,
                 drop_path_rate: float = 0.0, grad_checkpointing: bool = False, pos_embed: str = "sincos",
                 init: str = "mae", layer_scale: float | None = None, final_norm: bool = True) -> None:
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
            table = sincos_2d(dim, self.grid_size, rows_first=pos_embed == "sincos_rows_first")
            self.register_buffer("pos_embed", table[None], persistent=False)
        self.blocks = build_blocks(dim, depth, heads, drop_path_rate, layer_scale)
        self.norm = LayerNorm(dim) if final_norm else nn.Identity()  # SIM pretrains without one
        self.grad_checkpointing = grad_checkpointing
        self.apply(INITS[init])
        if init == "cae":
            rescale_residual_branches(self.blocks)

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

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None,
                last_blocks: int = 0) -> torch.Tensor:
        """Encode all patches, or only patches `keep_idx` [B, K]; returns [B, 1 + K, D] after the final norm.
        With `last_blocks` = n > 0: [n, B, 1 + K, D], the outputs of the last n blocks, each through the final norm
        (DINO's get_intermediate_layers, for its linear evaluation)."""
        x, cls_position = self.embed_patches(images)
        if keep_idx is not None:
            x = torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + cls_position.to(self.cls_token.dtype)).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        if last_blocks:
            outputs = []
            for index, block in enumerate(self.blocks):
                x = block(x)
                if index >= len(self.blocks) - last_blocks:
                    outputs.append(self.norm(x))
            return torch.stack(outputs)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x)

    def forward_pooled(self, images: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """[B, D] after the final norm: the [cls] output ("cls") or the mean of the patch outputs ("mean"; for
        CAE, which trains no [cls] loss). Through __call__, so ZeRO-3 gathers this module's own parameters."""
        tokens = self(images)
        return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)

    def forward_cls(self, images: torch.Tensor) -> torch.Tensor:
        """[B, D]: the [cls] output after the final norm (the feature k-NN and linear probes read).

        Goes through __call__ so that ZeRO-3 gathers this module's own parameters (cls_token, pos_embed)."""
        return self(images)[:, 0]
