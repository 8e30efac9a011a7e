"""DINO multi-crop augmentation: two global views and any number of small local views of one image.

Follows the recipe of `DataAugmentationDINO` in the official DINO code (Caron et al. 2021,
https://github.com/facebookresearch/dino/blob/main/main_dino.py), written here with torchvision transforms v2.
The two global views are deliberately asymmetric: the first is always blurred, the second is rarely blurred but
may be solarised, and local views are blurred half the time.

The blur is PIL's `ImageFilter.GaussianBlur` with a random radius, as in the official code, rather than
torchvision's `GaussianBlur`, which needs a kernel size and so filters differently. Every random choice is drawn
from torch's global RNG, because the data pipeline seeds torch per sample before calling the transform.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode, v2

from largessl.data.transforms import to_normalized_tensor

View = Callable[[Image.Image], torch.Tensor]


class PILGaussianBlur:
    """With probability p, blur a PIL image with a Gaussian of radius drawn uniformly from [radius_min, radius_max]."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, image: Image.Image) -> Image.Image:
        # Both draws happen even when the blur is skipped, so how much of the RNG a view consumes never depends
        # on the outcome; torch.rand is in [0, 1), so p=1.0 always blurs and p=0.0 never does.
        apply, unit = torch.rand(2).tolist()
        if apply >= self.p:
            return image
        radius = self.radius_min + (self.radius_max - self.radius_min) * unit
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius=({self.radius_min}, {self.radius_max}))"


def colour_steps(*, blur_p: float, solarize_p: float = 0.0) -> list[Callable]:
    """BYOL's colour augmentation, as DINO and SIM use it: jitter (p 0.8) -> grayscale (p 0.2) -> PIL blur
    (p `blur_p`) -> solarise (p `solarize_p`) -> normalise."""
    steps = [
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        PILGaussianBlur(blur_p),
    ]
    if solarize_p > 0:
        # On a PIL image this is ImageOps.solarize(image, 128): pixels >= 128 are inverted.
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    return [*steps, *to_normalized_tensor()]


def build_view(size: int, scale: tuple[float, float], *, blur_p: float, solarize_p: float = 0.0) -> v2.Compose:
    """One view's pipeline: crop -> flip -> colour jitter -> grayscale -> blur -> solarise -> normalise."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        *colour_steps(blur_p=blur_p, solarize_p=solarize_p),
    ])


class MultiCropTransform:
    """DINO views of one PIL image: {"globals": [2, 3, G, G], "locals": [num_local, 3, L, L]}, normalised float32.

    `global_views` holds the two global pipelines (index 0 always blurred; index 1 blurred with p 0.1 and
    solarised with p 0.2) and `local_view` the pipeline applied num_local times.
    """

    def __init__(self, *, global_size: int, local_size: int, num_local: int,
                 global_scale: tuple[float, float] = (0.4, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.4)) -> None:
        if num_local < 0:
            raise ValueError(f"num_local must be >= 0, got {num_local}")
        self.global_size, self.local_size, self.num_local = global_size, local_size, num_local
        self.global_views: list[View] = [
            build_view(global_size, global_scale, blur_p=1.0),
            build_view(global_size, global_scale, blur_p=0.1, solarize_p=0.2),
        ]
        self.local_view: View = build_view(local_size, local_scale, blur_p=0.5)

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        globals_ = torch.stack([view(image) for view in self.global_views])
        if self.num_local == 0:
            # An empty but correctly shaped tensor keeps torch.stack in the default collate working.
            locals_ = torch.empty(0, 3, self.local_size, self.local_size, dtype=torch.float32)
        else:
            locals_ = torch.stack([self.local_view(image) for _ in range(self.num_local)])
        return {"globals": globals_, "locals": locals_}
