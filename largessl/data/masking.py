"""BEiT's block-wise mask generator (methods.md 1.3), in the two variants CAE and SIM use.

A mask is a bool tensor [H*W] over the patch grid, row-major, True = masked, with exactly `num_masked` cells:
both CAE and SIM gather the visible tokens with a reshape, which needs the same count in every image.

- "exact" (CAE): keep placing blocks until the count is reached; the reference loop never gives up.
- "top_up" (SIM): BEiT's original loop, which stops at the first round that adds nothing, then uniformly random
  unmasked cells until the count is reached.

Every random number comes from torch's global CPU RNG, never Python's `random`: the data pipeline seeds torch
per sample (largessl/data/loader.py), and that is what makes a sample's mask the same whatever the worker count.
Torch is imported inside the functions that draw, so `check_mask_count` can be imported by a torch-free config.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, NamedTuple

from largessl.config.loader import require

if TYPE_CHECKING:
    import torch

Variant = Literal["exact", "top_up"]
VARIANTS: tuple[str, ...] = ("exact", "top_up")
MIN_ASPECT = 0.3
"""Block aspect ratios (height / width) are log-uniform in [MIN_ASPECT, 1 / MIN_ASPECT] (both reference codes)."""
_LOG_ASPECT = (math.log(MIN_ASPECT), math.log(1 / MIN_ASPECT))
TRIES_PER_ROUND = 10
"""Boxes drawn per round before the round counts as adding nothing (BEiT's `_mask`)."""
MAX_IDLE_ROUNDS = 10_000
"""Our guard, not the reference's: after this many rounds in a row that add nothing, the "exact" variant
finishes with uniformly random cells instead of looping forever (say num_masked = N - 1 on a grid where almost
no allowed box fits). At the recipes' counts (98/196, 128/256) no round streak comes anywhere near it."""
_DRAW_CHUNK = 64
"""Uniforms fetched from torch per call (16 tries' worth): one torch call serves most of a mask."""


class Block(NamedTuple):
    """A placed block: its top-left cell and its size, in patches."""

    top: int
    left: int
    height: int
    width: int


def mask_count_problem(num_masked: int, num_patches: int, min_num_patches: int = 16,
                       max_num_patches: int | None = None) -> str | None:
    """What is wrong with these generator settings, or None when a mask can be made from them."""
    if not 0 < num_masked < num_patches:
        return (f"{num_masked} masked of {num_patches} patches; need at least one masked and one visible patch, "
                f"so 1 <= num_masked <= {num_patches - 1}")
    if min_num_patches < 1:
        return f"min_num_patches (smallest block) must be >= 1, got {min_num_patches}"
    if max_num_patches is not None and max_num_patches < 1:
        return f"max_num_patches (largest block) must be >= 1, got {max_num_patches}"
    return None


def check_mask_count(key: str, num_masked: int, num_patches: int, min_num_patches: int = 16,
                     max_num_patches: int | None = None) -> None:
    """For a config's validate(): raise a ConfigError about `key` unless the settings can make a mask."""
    problem = mask_count_problem(num_masked, num_patches, min_num_patches, max_num_patches)
    require(problem is None, key, problem or "")


class _Uniforms:
    """U[0, 1) floats from torch's global RNG, fetched a chunk at a time to keep the number of torch calls low.

    One instance serves one mask and the unused tail of its last chunk is dropped, so how much RNG a mask
    consumes depends only on the seed: the same seed gives the same mask and leaves the same RNG state.
    """

    def __init__(self) -> None:
        self.values: list[float] = []

    def take(self, count: int) -> list[float]:
        """The next `count` uniforms."""
        if len(self.values) < count:
            import torch

            self.values += torch.rand(max(_DRAW_CHUNK, count), dtype=torch.float64).tolist()
        taken, self.values = self.values[:count], self.values[count:]
        return taken


class _Grid:
    """The mask being built: one byte per cell, row-major, 1 = masked."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.cells = bytearray(height * width)

    def masked_inside(self, box: Block) -> int:
        """How many cells of `box` are already masked."""
        start = box.top * self.width + box.left
        return sum(sum(self.cells[row: row + box.width])
                   for row in range(start, start + box.height * self.width, self.width))

    def fill(self, box: Block) -> None:
        """Mark every cell of `box` masked."""
        start = box.top * self.width + box.left
        for row in range(start, start + box.height * self.width, self.width):
            self.cells[row: row + box.width] = b"\x01" * box.width

    def fill_random(self, count: int) -> None:
        """Mask `count` more cells, a uniformly random subset of the unmasked ones (one torch.randperm)."""
        if count == 0:
            return  # the usual case for "exact": draw nothing, so the RNG is not consumed for no reason
        import torch

        for cell in torch.randperm(len(self.cells)).tolist():
            if count == 0:
                return
            if not self.cells[cell]:
                self.cells[cell] = 1
                count -= 1

    def to_tensor(self) -> torch.Tensor:
        """The mask as a bool tensor [H*W] (a copy: the grid's bytes are not shared)."""
        import torch

        return torch.frombuffer(self.cells, dtype=torch.uint8).to(torch.bool)


class BlockMaskGenerator:
    """Exactly `num_masked` of the H x W patches masked, in rectangular blocks (methods.md 1.3).

    Each round draws boxes of area U(min_num_patches, budget) (Python's uniform: between the two even when the
    budget is the smaller) and aspect log-uniform in [0.3, 1/0.3], where budget = min(cells still to mask,
    max_num_patches). A box is kept when it is strictly smaller than the grid in both directions and adds
    between 1 and `budget` new cells; a round stops at its first kept box or after 10 tries.
    """

    def __init__(self, grid_size: int | tuple[int, int], num_masked: int, *, min_num_patches: int = 16,
                 max_num_patches: int | None = None, variant: Variant = "exact") -> None:
        self.height, self.width = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
        problem = mask_count_problem(num_masked, self.height * self.width, min_num_patches, max_num_patches)
        if problem is None and variant not in VARIANTS:
            problem = f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}"
        if problem is not None:
            raise ValueError(problem)
        self.num_masked, self.min_num_patches, self.variant = num_masked, min_num_patches, variant
        self.max_num_patches = num_masked if max_num_patches is None else max_num_patches

    def __call__(self) -> torch.Tensor:
        """A fresh mask [H*W] bool, True = masked."""
        return self.generate()[0]

    def generate(self) -> tuple[torch.Tensor, list[Block]]:
        """A fresh mask and the blocks placed, in order (random top-up cells are not blocks)."""
        grid, uniforms, blocks = _Grid(self.height, self.width), _Uniforms(), []
        count = self._place_blocks(grid, uniforms, blocks)
        grid.fill_random(self.num_masked - count)
        return grid.to_tensor(), blocks

    def _place_blocks(self, grid: _Grid, uniforms: _Uniforms, blocks: list[Block]) -> int:
        """Rounds of block placement until the variant stops; returns how many cells they masked."""
        count, idle = 0, 0
        limit = 1 if self.variant == "top_up" else MAX_IDLE_ROUNDS
        while count < self.num_masked and idle < limit:
            added = self._round(grid, uniforms, blocks, min(self.num_masked - count, self.max_num_patches))
            count, idle = count + added, 0 if added else idle + 1
        return count

    def _round(self, grid: _Grid, uniforms: _Uniforms, blocks: list[Block], budget: int) -> int:
        """Up to 10 tries at one block adding 1..budget new cells; returns the cells added (0: none kept)."""
        for _ in range(TRIES_PER_ROUND):
            box = self._draw_box(uniforms.take(4), budget)
            if box is None:
                continue
            added = box.height * box.width - grid.masked_inside(box)
            if 0 < added <= budget:
                grid.fill(box)
                blocks.append(box)
                return added
        return 0

    def _draw_box(self, draws: list[float], budget: int) -> Block | None:
        """One candidate box from four uniforms, or None when it is not strictly smaller than the grid."""
        u_area, u_aspect, u_top, u_left = draws
        area = self.min_num_patches + (budget - self.min_num_patches) * u_area
        aspect = math.exp(_LOG_ASPECT[0] + (_LOG_ASPECT[1] - _LOG_ASPECT[0]) * u_aspect)
        height, width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if not (height < self.height and width < self.width):
            return None
        top = min(int(u_top * (self.height - height + 1)), self.height - height)
        left = min(int(u_left * (self.width - width + 1)), self.width - width)
        return Block(top, left, height, width)
