"""Per-image transforms, run in DataLoader workers under a per-sample seed (torchvision transforms v2)."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_normalized_tensor() -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


class MAETransform:
    """MAE pretraining view: RandomResizedCrop (bicubic) + horizontal flip + normalise, plus masking noise.

    The noise [N] decides which patches the encoder sees (methods.md 2.2); it is drawn here so the mask
    follows the sample's seed like every other random choice.
    """

    def __init__(self, image_size: int, crop_scale: tuple[float, float], num_patches: int) -> None:
        self.num_patches = num_patches
        self.augment = v2.Compose([
            v2.RandomResizedCrop(image_size, scale=crop_scale, interpolation=InterpolationMode.BICUBIC,
                                 antialias=True),
            v2.RandomHorizontalFlip(),
            *to_normalized_tensor(),
        ])

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return {"image": self.augment(image), "mask_noise": torch.rand(self.num_patches)}


class EvalTransform:
    """k-NN / probe view (methods.md 1.8): resize the short side to 256/224 x size (bicubic), centre crop."""

    def __init__(self, image_size: int) -> None:
        self.augment = v2.Compose([
            v2.Resize(round(image_size * 256 / 224), interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            *to_normalized_tensor(),
        ])

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return {"image": self.augment(image)}


def mae_pretrain_transform(image_size: int, crop_scale: tuple[float, float], num_patches: int) -> MAETransform:
    return MAETransform(image_size, crop_scale, num_patches)
