"""Per-image transforms, run in DataLoader workers under a per-sample seed (torchvision transforms v2)."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from largessl.data.masking import BlockMaskGenerator

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


class CAETransform:
    """CAE pretraining view (methods.md 4.2): one crop and one flip, seen at two resolutions, plus a block mask.

    RandomResizedCrop (bicubic, scale `crop_scale`, ratio 3/4..4/3) + horizontal flip + ImageNet normalisation,
    no colour jitter, gives "image" [3, S, S]. "mask" [N] bool (True = masked) has exactly `num_masked` patches
    in BEiT blocks ("exact" variant of largessl.data.masking). With `tokenizer_size` > 0 the same crop box and
    the same flip are also resized with Lanczos to "tokenizer_image" [3, t, t] in [0, 1], unnormalised, since the
    DALL-E tokenizer applies its own map_pixels; another crop or flip would give targets that miss the patches.
    Random draws, in order: crop box, flip, mask (all torch's global RNG, seeded per sample by the loader).
    """

    def __init__(self, image_size: int, num_patches_side: int, num_masked: int,
                 crop_scale: tuple[float, float] = (0.08, 1.0), tokenizer_size: int = 0, *,
                 min_num_patches: int = 16) -> None:
        self.image_size, self.tokenizer_size = image_size, tokenizer_size
        self.crop_scale, self.crop_ratio = list(crop_scale), [3 / 4, 4 / 3]
        self.normalize = v2.Compose(to_normalized_tensor())
        self.to_unit_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        self.masks = BlockMaskGenerator(num_patches_side, num_masked, min_num_patches=min_num_patches, variant="exact")

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        crop = self.crop_and_flip(image)
        size = [self.image_size, self.image_size]
        view = F.resize(crop, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        out = {"image": self.normalize(view), "mask": self.masks()}
        if self.tokenizer_size > 0:
            small = crop.resize((self.tokenizer_size, self.tokenizer_size), Image.Resampling.LANCZOS)
            out["tokenizer_image"] = self.to_unit_tensor(small)
        return out

    def crop_and_flip(self, image: Image.Image) -> Image.Image:
        """The random crop at its original resolution, flipped with p 0.5: drawn once, shared by both views."""
        top, left, height, width = v2.RandomResizedCrop.get_params(image, self.crop_scale, self.crop_ratio)
        crop = F.crop(image, top, left, height, width)
        return F.horizontal_flip(crop) if torch.rand(1).item() < 0.5 else crop


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


def cae_pretrain_transform(image_size: int, num_patches_side: int, num_masked: int,
                           crop_scale: tuple[float, float] = (0.08, 1.0), tokenizer_size: int = 0, *,
                           min_num_patches: int = 16) -> CAETransform:
    """CAE's sample transform: an `image_size` view over a `num_patches_side`^2 patch grid (methods.md 4.2)."""
    return CAETransform(image_size, num_patches_side, num_masked, crop_scale, tokenizer_size,
                        min_num_patches=min_num_patches)
