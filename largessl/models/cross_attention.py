"""Cross-attention as CAE uses it (methods.md 4.1): queries from one set of tokens, keys and values from another.

`CrossAttention` has separate q, k, v projections without bias plus learned q and v biases and a fixed zero k bias
(BEiT's convention), then an output projection. `RegressorBlock` is CAE's latent-regressor block:

    x = q + drop_path(gamma_1 * CrossAttn(LN_q(q + pos_q), keys = LN_k(kv + pos_kv), values = LN_v(kv)))
    x = LN_2(x)                                   # normalises the residual stream itself, as the official code
    x = x + drop_path(gamma_2 * MLP(x))

Reference: https://github.com/Atten4Vis/CAE/blob/master/models/modeling_cae_helper.py (CrossAttention,
RegressorBlock); attention itself through F.scaled_dot_product_attention (the same softmax(q k^T / sqrt(d)) v).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from largessl.models.vit import LayerNorm


class CrossAttention(nn.Module):
    """Multi-head attention of `queries` [B, Nq, D] over `keys` [B, Nk, D] and `values` [B, Nk, D]."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, heads, N, D / heads]."""
        return x.reshape(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        q = self.split_heads(F.linear(queries, self.q.weight, self.q_bias))
        k = self.split_heads(self.k(keys))  # the k bias is fixed at zero
        v = self.split_heads(F.linear(values, self.v.weight, self.v_bias))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(queries.shape))


class RegressorBlock(nn.Module):
    """One block of CAE's latent contextual regressor (see the module docstring); `layer_scale` initialises the
    per-channel gammas of both branches."""

    def __init__(self, dim: int, heads: int, *, drop_path: float = 0.0, layer_scale: float = 0.1) -> None:
        super().__init__()
        self.norm1_q, self.norm1_k, self.norm1_v = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.gamma_1 = nn.Parameter(torch.full((dim,), layer_scale))
        self.gamma_2 = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, queries: torch.Tensor, kv: torch.Tensor, pos_q: torch.Tensor,
                pos_kv: torch.Tensor) -> torch.Tensor:
        attended = self.cross_attn(self.norm1_q(queries + pos_q), self.norm1_k(kv + pos_kv), self.norm1_v(kv))
        x = self.norm2(queries + self.drop_path(self.gamma_1 * attended))
        return x + self.drop_path(self.gamma_2 * self.mlp(x))
