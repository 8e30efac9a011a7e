"""SIM's two views of one image and their exact relative geometry (methods.md 5.1.4 and 5.2).

Each view first flips the whole image (p 0.5), then takes its own RandomResizedCrop box (i, j, h, w) in that
possibly mirrored frame (torchvision's 10-try algorithm with the central fallback, bicubic), then BYOL's colour
augmentation, asymmetric as in SIM: view 1 (online, masked) always blurred, view 2 (target) blurred with p 0.1 and
solarised with p 0.2. View 1 gets a block mask of exactly M patches (BEiT's loop topped up at random, the "top_up"
variant of largessl.data.masking). The geometry of view 2 in units of view 1's box,

    di = (i2 - i1) / h1, dj = (j2 - j1) / w1, dh = h2 / h1, dw = w2 / w1,
    flip = flip1 XOR flip2, dj_flip = (W - j1 - j2) / w1     (W: the source image's width)

is what `largessl.models.pos_embed.sincos_relative` turns into the positions of view 2's patches in view 1's patch
frame. Flipping before cropping is what makes these formulas right: each box is expressed in its own view's frame,
and dj_flip mirrors one frame into the other. Random draws, in order: flip 1, flip 2, box 1, box 2, colour 1,
colour 2, mask (torch's global RNG, seeded per sample by the loader).

Reference: https://github.com/OpenGVLab/Siamese-Image-Modeling/blob/main/main_pretrain.py (DataAugmentationForSIM),
util/augmentation.py (RandomHorizontalFlip, SingleRandomResizedCrop)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from largessl.data.masking import BlockMaskGenerator
from largessl.data.multicrop import colour_steps

CROP_RATIO = (3 / 4, 4 / 3)


class ViewBox(NamedTuple):
    """Where a view comes from: flipped first or not, then the crop box (top, left, height, width) in pixels of
    the (flipped) source image."""

    flip: bool
    top: int
    left: int
    height: int
    width: int


def relative_geometry(box1: ViewBox, box2: ViewBox, image_width: int) -> torch.Tensor:
    """[6] float64: (di, dj, dh, dw, flip, dj_flip) of view 2 relative to view 1 (the module docstring)."""
    return torch.tensor([
        (box2.top - box1.top) / box1.height,
        (box2.left - box1.left) / box1.width,
        box2.height / box1.height,
        box2.width / box1.width,
        float(box1.flip != box2.flip),
        (image_width - box1.left - box2.left) / box1.width,
    ], dtype=torch.float64)


class SIMTransform:
    """{"view1", "view2": [3, S, S] normalised, "mask": [N] bool (True = masked, exactly `num_masked`, view 1),
    "geometry": [6] float64 (relative_geometry)} from one PIL image."""

    def __init__(self, image_size: int, grid_size: int, num_masked: int, *,
                 crop_scale: tuple[float, float] = (0.08, 1.0), min_num_patches: int = 16) -> None:
        self.image_size, self.crop_scale = image_size, list(crop_scale)
        self.colour = [v2.Compose(colour_steps(blur_p=1.0)), v2.Compose(colour_steps(blur_p=0.1, solarize_p=0.2))]
        self.masks = BlockMaskGenerator(grid_size, num_masked, min_num_patches=min_num_patches, variant="top_up")

    def render(self, image: Image.Image | torch.Tensor, box: ViewBox) -> Image.Image | torch.Tensor:
        """The view's pixels before colour: flip the whole image, then crop the box and resize (bicubic)."""
        source = F.horizontal_flip(image) if box.flip else image
        return F.resized_crop(source, box.top, box.left, box.height, box.width, [self.image_size] * 2,
                              interpolation=InterpolationMode.BICUBIC, antialias=True)

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        flips = [torch.rand(1).item() < 0.5 for _ in range(2)]
        boxes = [ViewBox(flip, *v2.RandomResizedCrop.get_params(image, self.crop_scale, list(CROP_RATIO)))
                 for flip in flips]
        views = [colour(self.render(image, box)) for colour, box in zip(self.colour, boxes, strict=True)]
        return {"view1": views[0], "view2": views[1], "mask": self.masks(),
                "geometry": relative_geometry(boxes[0], boxes[1], F.get_size(image)[1])}
