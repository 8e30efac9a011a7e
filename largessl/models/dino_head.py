"""DINO's projection head (methods.md 3.1): 3-layer MLP to a bottleneck, L2 normalisation, weight-normalised
last layer with K outputs whose rows are unit vectors (the logits are cosines) unless their norms are learned.

The weight norm is written out (w = g v / ||v|| per output row, as torch's weight_norm with dim 0) instead
of using torch's parametrization: that hides the parameters in a submodule whose forward never runs, and
ZeRO-3 gathers a module's own parameters only for its own forward.

Reference: https://github.com/facebookresearch/dino/blob/main/vision_transformer.py (DINOHead)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight rows g_k v_k / ||v_k||; g is fixed at 1 unless `learn_norm`."""

    def __init__(self, in_dim: int, out_dim: int, *, learn_norm: bool) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # PyTorch's Linear default, as in the official head
        # Official: g starts at 1 and is frozen with norm_last_layer=True (the default).
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1)) if learn_norm else None

    def weight(self) -> torch.Tensor:
        v = self.weight_v.float()
        w = v / v.norm(dim=1, keepdim=True)  # in fp32: a bf16 norm over 256 squares loses 3 digits
        return w * self.weight_g.float() if self.weight_g is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype))


class DINOHead(nn.Module):
    """[N, in_dim] features -> [N, out_dim] prototype logits."""

    def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, learn_norm=not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


@torch.no_grad()
def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
