"""BEiT block-wise masks (CAE "exact", SIM "top_up") and the CAE transform, on real JPEGs and real workers."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from largessl.data.masking import MIN_ASPECT, Block, BlockMaskGenerator, check_mask_count, mask_count_problem
from largessl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, CAETransform, cae_pretrain_transform
from largessl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
JPEGS = sorted((REPO / "demo" / "imagenette-mini" / "train").rglob("*.JPEG"))
SEEDS = range(500)
# (grid side, num_masked): CAE ViT-B/16 (98 of 196), CAE ViT-H/14 at 224 px (128 of 256), SIM (118 of 196).
RECIPES = [(14, 98), (16, 128), (14, 118)]


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(JPEGS[0]) as image:
        return image.convert("RGB")


def seeded_generate(generator: BlockMaskGenerator, seed: int) -> tuple[torch.Tensor, list[Block]]:
    torch.manual_seed(seed)
    return generator.generate()


def components(mask: torch.Tensor, side: int) -> int:
    """Number of 4-connected groups of masked cells."""
    cells = mask.view(side, side).tolist()
    seen: set[tuple[int, int]] = set()
    count = 0
    for start in ((r, c) for r in range(side) for c in range(side) if cells[r][c]):
        if start in seen:
            continue
        count, stack = count + 1, [start]
        seen.add(start)
        while stack:
            r, c = stack.pop()
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < side and 0 <= nc < side and cells[nr][nc] and (nr, nc) not in seen:
                    seen.add((nr, nc))
                    stack.append((nr, nc))
    return count


def union_of(blocks: list[Block], side: int) -> torch.Tensor:
    grid = torch.zeros(side, side, dtype=torch.bool)
    for top, left, height, width in blocks:
        grid[top: top + height, left: left + width] = True
    return grid.flatten()


def aspect_possible(height: int, width: int) -> bool:
    """Whether rounding can produce this box from a drawn aspect in [0.3, 1/0.3].

    The drawn sides h* = sqrt(area x ar) and w* = sqrt(area / ar) have h*/w* = ar exactly; rounding moves each
    by at most 0.5. So some h* in [h - 0.5, h + 0.5] and w* in [w - 0.5, w + 0.5] must have a ratio in range.
    """
    lowest, highest = (height - 0.5) / (width + 0.5), (height + 0.5) / (width - 0.5)
    return lowest <= 1 / MIN_ASPECT and highest >= MIN_ASPECT


@pytest.mark.parametrize("variant", ["exact", "top_up"])
@pytest.mark.parametrize(("side", "num_masked"), RECIPES)
def test_every_mask_has_exactly_the_requested_count(side: int, num_masked: int, variant: str) -> None:
    generator = BlockMaskGenerator(side, num_masked, variant=variant)
    for seed in SEEDS:
        mask, blocks = seeded_generate(generator, seed)
        assert mask.shape == (side * side,) and mask.dtype == torch.bool
        assert int(mask.sum()) == num_masked, seed
        assert not (union_of(blocks, side) & ~mask).any()  # every block placed is in the mask
        if variant == "exact":  # blocks alone reach the count: no random cells
            assert torch.equal(union_of(blocks, side), mask)


def test_aspect_bound_is_not_vacuous() -> None:
    assert aspect_possible(1, 5) and aspect_possible(5, 1) and aspect_possible(4, 4)
    assert not aspect_possible(1, 6) and not aspect_possible(6, 1) and not aspect_possible(2, 11)


@pytest.mark.parametrize("variant", ["exact", "top_up"])
@pytest.mark.parametrize(("side", "num_masked"), RECIPES)
def test_blocks_respect_the_geometry_the_algorithm_guarantees(side: int, num_masked: int, variant: str) -> None:
    generator = BlockMaskGenerator(side, num_masked, variant=variant)
    tall = wide = 0
    for seed in SEEDS:
        _, blocks = seeded_generate(generator, seed)
        for top, left, height, width in blocks:
            assert 1 <= height < side and 1 <= width < side  # strictly smaller than the grid
            assert 0 <= top <= side - height and 0 <= left <= side - width
            assert aspect_possible(height, width), (height, width)
            tall, wide = tall + (height > width), wide + (width > height)
        # The first block had the whole count as budget: area U(16, M) -> its rounded sides bracket that range,
        # and a box may only add up to the budget.
        height, width = blocks[0].height, blocks[0].width
        assert (height + 0.5) * (width + 0.5) >= 16 and (height - 0.5) * (width - 0.5) <= num_masked
        assert height * width <= num_masked
    assert 0.85 < tall / wide < 1.18  # the log-uniform aspect is symmetric


@pytest.mark.parametrize(("side", "num_masked"), RECIPES[:2])
def test_exact_masks_are_a_few_blocks_not_scattered_cells(side: int, num_masked: int) -> None:
    generator = BlockMaskGenerator(side, num_masked)
    groups = []
    for seed in SEEDS:
        mask, blocks = seeded_generate(generator, seed)
        groups.append(components(mask, side))
        assert groups[-1] <= len(blocks) <= 20  # a union of k rectangles has at most k connected groups
    torch.manual_seed(0)
    scattered = [components(torch.randperm(side * side) < num_masked, side) for _ in range(50)]
    assert sum(groups) / len(groups) < 3 and max(groups) <= 8
    assert min(scattered) >= 8  # the measure does separate block masks from uniform random ones


def test_sim_top_up_adds_only_a_few_random_cells() -> None:
    generator = BlockMaskGenerator(14, 118, variant="top_up")
    topped = [118 - int(union_of(seeded_generate(generator, seed)[1], 14).sum()) for seed in SEEDS]
    assert sum(topped) / len(topped) < 3 and any(topped)  # the top-up does happen, rarely and by little


@pytest.mark.parametrize("variant", ["exact", "top_up"])
def test_same_torch_seed_same_mask_and_python_random_is_not_used(variant: str) -> None:
    generator = BlockMaskGenerator(14, 118, variant=variant)
    random.seed(1)
    np.random.seed(1)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    first, blocks = seeded_generate(generator, 7)
    after_first = torch.get_rng_state()
    random.seed(2)
    second, again = seeded_generate(generator, 7)
    assert torch.equal(first, second) and blocks == again
    assert torch.equal(after_first, torch.get_rng_state())  # the RNG consumed depends on the seed only
    random.seed(1)
    assert random.getstate() == python_state and np.random.get_state()[1].tolist() == numpy_state[1].tolist()


def test_different_seeds_give_different_masks() -> None:
    generator = BlockMaskGenerator(14, 98)
    masks = {tuple(seeded_generate(generator, seed)[0].tolist()) for seed in range(100)}
    assert len(masks) == 100


def test_the_guard_finishes_when_no_allowed_box_fits() -> None:
    # On a 1 x 8 grid no box is strictly shorter than the grid, so the reference "exact" loop would never end.
    mask, blocks = seeded_generate(BlockMaskGenerator((1, 8), 4), 0)
    assert int(mask.sum()) == 4 and blocks == []
    for side in (14, 16):  # all but one patch masked: the blocks still get there
        assert int(seeded_generate(BlockMaskGenerator(side, side * side - 1), 0)[0].sum()) == side * side - 1


class SeededMasks(Dataset):
    """Like the training stream: seed torch per item, then run the per-sample random code."""

    def __init__(self, image: Image.Image) -> None:
        self.generator = BlockMaskGenerator(16, 128)
        self.transform = CAETransform(32, 4, 8, tokenizer_size=16)
        self.image = image

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(1000 + index)
        item = {f"cae_{k}": v for k, v in self.transform(self.image).items()}
        return {"mask": self.generator(), **item}


def test_worker_processes_make_the_same_masks_as_the_main_process(photo: Image.Image) -> None:
    dataset = SeededMasks(photo.resize((64, 48)))
    here = [dataset[i] for i in range(len(dataset))]
    there = list(DataLoader(dataset, batch_size=None, num_workers=2))
    assert len(there) == len(here)
    for mine, theirs in zip(here, there, strict=True):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), key


def test_check_mask_count_imports_no_torch() -> None:
    probe = ("import sys\nfrom largessl.data.masking import check_mask_count\n"
             "check_mask_count('objective.num_masked', 98, 196)\n"
             "print(sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True,
                            cwd=REPO)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(("num_masked", "num_patches", "min_num", "max_num", "ok"), [
    (98, 196, 16, None, True), (195, 196, 16, None, True), (1, 196, 1, 1, True),
    (0, 196, 16, None, False), (196, 196, 16, None, False), (-3, 196, 16, None, False),
    (98, 196, 0, None, False), (98, 196, 16, 0, False),
])
def test_validation(num_masked: int, num_patches: int, min_num: int, max_num: int | None, ok: bool) -> None:
    assert (mask_count_problem(num_masked, num_patches, min_num, max_num) is None) == ok
    if ok:
        check_mask_count("objective.num_masked", num_masked, num_patches, min_num, max_num)
        return
    with pytest.raises(ConfigError, match=r"^objective\.num_masked: "):
        check_mask_count("objective.num_masked", num_masked, num_patches, min_num, max_num)
    side = int(num_patches ** 0.5)
    with pytest.raises(ValueError):
        BlockMaskGenerator(side, num_masked, min_num_patches=min_num, max_num_patches=max_num)


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="variant"):
        BlockMaskGenerator(14, 98, variant="beit")  # type: ignore[arg-type]


# ----- CAETransform on real images -----

def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def shrink(image: torch.Tensor, size: int) -> torch.Tensor:
    """The encoder view, unnormalised and downsized to the tokenizer's size."""
    return F.resize(unnormalize(image), [size, size], interpolation=InterpolationMode.BICUBIC,
                    antialias=True).clamp(0, 1)


def drawn_flip(transform: CAETransform, image: Image.Image, seed: int) -> bool:
    """Replays the transform's first two draws (crop box, then flip) to learn whether this seed flips."""
    torch.manual_seed(seed)
    RandomResizedCrop.get_params(image, transform.crop_scale, transform.crop_ratio)
    return torch.rand(1).item() < 0.5


def test_cae_transform_shapes_dtypes_and_value_ranges(photo: Image.Image) -> None:
    transform = cae_pretrain_transform(224, 14, 98, tokenizer_size=112)
    torch.manual_seed(0)
    out = transform(photo)
    assert set(out) == {"image", "mask", "tokenizer_image"}
    assert out["image"].shape == (3, 224, 224) and out["image"].dtype == torch.float32
    assert out["mask"].shape == (196,) and out["mask"].dtype == torch.bool and int(out["mask"].sum()) == 98
    assert out["tokenizer_image"].shape == (3, 112, 112) and out["tokenizer_image"].dtype == torch.float32
    assert 0 <= out["tokenizer_image"].min() and out["tokenizer_image"].max() <= 1
    assert out["image"].min() < 0 and out["image"].max() > 1  # normalised, not [0, 1]
    assert -2.2 < out["image"].mean() < 2.7 and 0.1 < out["image"].std() < 2.0
    assert "tokenizer_image" not in CAETransform(224, 14, 98)(photo)  # off by default


def test_tokenizer_view_is_the_same_crop_and_flip(photo: Image.Image) -> None:
    transform = CAETransform(224, 14, 98, tokenizer_size=112)
    outs, flips = {}, {}
    for seed in range(12):
        flips[seed] = drawn_flip(transform, photo, seed)
        torch.manual_seed(seed)
        outs[seed] = transform(photo)
    assert any(flips.values()) and not all(flips.values())
    for seed, out in outs.items():
        small, tokens = shrink(out["image"], 112), out["tokenizer_image"]
        same = (small - tokens).abs().mean()
        other = (shrink(outs[(seed + 1) % 12]["image"], 112) - tokens).abs().mean()
        mirrored = (small.flip(-1) - tokens).abs().mean()
        assert same < 0.02 and same * 4 < other, (seed, same, other)
        assert same * 3 < mirrored, (seed, flips[seed], same, mirrored)  # flipped (or not) in both views


def test_encoder_view_is_the_drawn_crop_flipped_as_drawn(photo: Image.Image) -> None:
    transform = CAETransform(224, 14, 98)
    for seed in range(6):
        flip = drawn_flip(transform, photo, seed)
        torch.manual_seed(seed)
        box = RandomResizedCrop.get_params(photo, transform.crop_scale, transform.crop_ratio)
        expected = F.resized_crop(F.pil_to_tensor(photo).float() / 255, *box, [224, 224],
                                  interpolation=InterpolationMode.BICUBIC, antialias=True)
        expected = expected.flip(-1) if flip else expected
        torch.manual_seed(seed)
        got = unnormalize(transform(photo)["image"])
        assert (got - expected.clamp(0, 1)).abs().mean() < 0.02, seed
