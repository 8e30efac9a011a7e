"""Fixed 2-D sin-cos position embeddings in MAE's layout, or CAE's (rows first) (methods.md 1.2).

References: https://github.com/facebookresearch/mae/blob/main/util/pos_embed.py
"""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[len(positions), dim]: first half sin(pos * omega_k), second half cos(pos * omega_k)."""
    # An integer arange, converted: DeepSpeed's zero.Init (ZeRO-3) casts every floating tensor a constructor
    # makes to the training dtype, so a float64 arange built there would be bf16 and the table off by ~1e-3.
    omega = 1.0 / 10000 ** (torch.arange(dim // 2).to(torch.float64) / (dim / 2.0))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True, rows_first: bool = False) -> torch.Tensor:
    """[(1 +) grid_size**2, dim] table, row-major over the patch grid, with a zero row for [cls].

    MAE's layout: the first dim/2 channels encode the column, the last dim/2 the row
    (its numpy meshgrid(grid_w, grid_h) makes the half it calls "h" the column). `rows_first`: CAE's layout
    (methods.md 1.2; Atten4Vis/CAE build_2d_sincos_position_embedding), the row in the first half.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    halves = [sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())]
    table = torch.cat(halves[::-1] if rows_first else halves, dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float()


def sincos_relative(dim: int, grid_size: int, geometry: torch.Tensor) -> torch.Tensor:
    """SIM's relative positions of view 2's patches in view 1's patch frame (methods.md 5.1.4), [B, N, 2 dim].

    `geometry` [B, 6] holds, per sample, (di, dj, dh, dw, flip, dj_flip) as SIMTransform computes them (box
    offsets and sizes of view 2 in units of view 1's box; flip = flip1 XOR flip2). View 2's patch (r, c) lies at
    y = dh (r + 0.5) + di G - 0.5 and x = dw (c + 0.5) + dj G - 0.5 in view 1's patch indices (x mirrored,
    -dw (c + 0.5) + dj_flip G - 0.5, when exactly one view is flipped). The first `dim` channels encode (y, x) in
    the layout of `sincos_2d(dim, G, rows_first=True)`, so identical views give view 1's own table; the last `dim`
    encode the scale, 10 ln dh and 10 ln dw, the same way ([0, 1, 0, 1] blocks when the views are equally large).
    Computed in float64 and returned as float32 (the reference works in float32).
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    g = geometry.to(torch.float64)
    di, dj, dh, dw, flip, dj_flip = (g[:, k:k + 1] for k in range(6))
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    centers_r = rows.flatten().to(g) + 0.5
    centers_c = cols.flatten().to(g) + 0.5
    y = dh * centers_r + di * grid_size - 0.5
    x_plain = dw * centers_c + dj * grid_size
    x_flipped = -dw * centers_c + dj_flip * grid_size
    x = torch.where(flip > 0.5, x_flipped, x_plain) - 0.5
    batch, count = g.shape[0], grid_size**2
    blocks = [sincos_1d(dim // 2, v.flatten()).view(batch, count, dim // 2)
              for v in (y, x, 10 * torch.log(dh).expand(-1, count), 10 * torch.log(dw).expand(-1, count))]
    return torch.cat(blocks, dim=-1).float()
