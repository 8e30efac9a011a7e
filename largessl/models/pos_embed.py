"""Fixed 2-D sin-cos position embeddings in MAE's layout, or CAE's (rows first) (methods.md 1.2).

References: https://github.com/facebookresearch/mae/blob/main/util/pos_embed.py
"""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[len(positions), dim]: first half sin(pos * omega_k), second half cos(pos * omega_k)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
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
