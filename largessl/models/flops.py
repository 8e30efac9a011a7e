"""The FLOP model (../shared/docs/performance.md section 1): forward FLOPs of the pieces our objectives are made of.

Only matrix products are counted (2 FLOPs per multiply-add): projections, MLPs, the two attention products, patch
embeddings, heads. Norms, softmax, activations and losses are left out, as in the MFU figures of peers. A training
step costs 3x the forward of what gets gradients (the backward is about twice the forward) plus 1x the forward of
what runs without them (EMA teachers, targets, frozen encoders); activation recomputation is not counted, so MFU
measures useful work. Each objective adds its pieces up from its own shapes in `flops_per_image()`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs per image of the parts that are trained and of those that run without gradients."""

    trained: float = 0.0
    no_grad: float = 0.0

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.trained + other.trained, self.no_grad + other.no_grad)

    @property
    def train_step(self) -> float:
        """FLOPs per image of one training step: 3x the trained forward, 1x the rest."""
        return 3 * self.trained + self.no_grad


def linear(tokens: float, d_in: int, d_out: int) -> float:
    return 2 * tokens * d_in * d_out


def block(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """A self-attention block: qkv, the two attention products, out projection, MLP."""
    return (linear(tokens, dim, 3 * dim) + 4 * tokens * tokens * dim + linear(tokens, dim, dim)
            + 2 * linear(tokens, dim, int(mlp_ratio * dim)))


def cross_block(queries: int, keys: int, dim: int, mlp: bool = True) -> float:
    """A cross-attention block: queries attend to keys/values (q on the queries, k and v on the keys), out
    projection, and an MLP on the queries unless `mlp` is False (CAE's attentive probe has none)."""
    attention = (linear(queries, dim, dim) + linear(keys, dim, 2 * dim) + 4 * queries * keys * dim
                 + linear(queries, dim, dim))
    return attention + (2 * linear(queries, dim, 4 * dim) if mlp else 0.0)


def blocks(stack: nn.ModuleList, tokens: int) -> float:
    """A stack of blocks of equal width (read from their qkv or fc1 layers) on `tokens` tokens."""
    return sum(block(tokens, width(b), mlp_ratio(b)) for b in stack)


def width(block_module: nn.Module) -> int:
    return block_module.mlp.fc1.in_features


def mlp_ratio(block_module: nn.Module) -> float:
    return block_module.mlp.fc1.out_features / block_module.mlp.fc1.in_features


def per_token(module: nn.Module) -> float:
    """Forward FLOPs of one token through every Linear in `module` (and DINO's weight-normed last layer)."""
    total = 0.0
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            total += linear(1, layer.in_features, layer.out_features)
        elif hasattr(layer, "weight_v"):  # models/dino_head.WeightNormLinear (ZeRO-3 keeps the shape in ds_shape)
            total += linear(1, *reversed(getattr(layer.weight_v, "ds_shape", layer.weight_v.shape)))
    return total


def patch_embed(patches: int, patch_size: int, dim: int) -> float:
    return linear(patches, 3 * patch_size * patch_size, dim)


def encoder(vit: nn.Module, tokens: int, patches: int | None = None) -> float:
    """A ViTEncoder on `tokens` tokens ([cls] included) after embedding `patches` patches (default: all of its
    grid; the encoders embed every patch before dropping the masked ones)."""
    patches = vit.num_patches if patches is None else patches
    return patch_embed(patches, vit.patch_size, vit.dim) + blocks(vit.blocks, tokens)
