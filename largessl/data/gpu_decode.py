"""The GPU input path (`data.decode: gpu`; MAE and CAE here, DINO and SIM in data/gpu_views.py): workers draw
the augmentation, the device decodes and applies it.

On the CPU path a DataLoader worker decodes each JPEG and augments it (data/transforms.py). At MAE ViT-B speeds that
is the bottleneck (../shared/docs/performance.md section 5), so here the worker only reads the JPEG's header, draws
the sample's random parameters from the same per-sample seed in the same order as the CPU transform (the crop box,
the flip, the mask noise), and passes the JPEG bytes on. The trainer's device stage then decodes the batch in one
call (torchvision's `decode_jpeg`, nvJPEG on a GPU) and crops, resizes (bicubic, antialiased), flips and
normalises each image on the device. Same parameters, same crops: the pixels differ from the CPU path's only by
the two resize kernels (PIL's and torch's bicubic), which the tests bound.

What the worker cannot read as an RGB or greyscale baseline/progressive JPEG (another format, CMYK, a header that
does not parse, data without the end-of-image marker) is skipped and recorded as the CPU path skips an undecodable
image. A JPEG that passes that check but fails to decode on the device is decoded again alone; one that still
fails becomes a black image, marked `valid` false, with a warning line.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from largessl.console import err_line
from largessl.data.gpu_colour import lanczos_resize
from largessl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

JPEG_EXTENSIONS = ("jpg", "jpeg")
END_OF_IMAGE = b"\xff\xd9"


class EncodedImage:
    """A sample's JPEG bytes and its size, checked without decoding; stands for the PIL image the CPU path makes
    (`size` is what the crop-box draw reads)."""

    def __init__(self, data: bytes, width: int, height: int) -> None:
        self.data, self.size = data, (width, height)

    def tensor(self) -> torch.Tensor:
        """The JPEG bytes as a uint8 tensor (what the batch carries to decode_jpeg)."""
        return torch.frombuffer(bytearray(self.data), dtype=torch.uint8)

    def stand_in(self) -> torch.Tensor:
        """What the crop-box draws read of an image: its size (a zero-stride [1, H, W] tensor)."""
        width, height = self.size
        return torch.zeros(()).expand(1, height, width)

    @classmethod
    def of(cls, sample: dict[str, Any]) -> EncodedImage | None:
        data = next((sample[ext] for ext in JPEG_EXTENSIONS if ext in sample), None)
        if data is None or END_OF_IMAGE not in data[-64:]:
            return None
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                    return None
                return cls(data, *image.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None


class MAEEncodedTransform:
    """The worker half of MAETransform: the crop box, the flip and the mask noise, drawn exactly as MAETransform
    draws them (RandomResizedCrop's box, then the flip's torch.rand(1) < 0.5, then the noise), and the bytes."""

    def __init__(self, image_size: int, crop_scale: tuple[float, float], num_patches: int) -> None:
        self.crop = v2.RandomResizedCrop(image_size, scale=crop_scale)
        self.num_patches = num_patches

    def __call__(self, image: EncodedImage) -> dict[str, torch.Tensor]:
        box = self.crop.make_params([image.stand_in()])  # only its size is read
        flip = torch.rand(1) < 0.5
        return {"jpeg": image.tensor(),
                "crop_box": torch.tensor([box["top"], box["left"], box["height"], box["width"]]),
                "flip": flip[0], "mask_noise": torch.rand(self.num_patches)}


class CAEEncodedTransform:
    """The worker half of CAETransform: its crop box, flip and block mask, drawn in its order (the tokenizer view
    of a DALL-E target draws nothing)."""

    def __init__(self, num_patches_side: int, num_masked: int, crop_scale: tuple[float, float], *,
                 min_num_patches: int) -> None:
        from largessl.data.masking import BlockMaskGenerator

        self.crop_scale, self.crop_ratio = list(crop_scale), [3 / 4, 4 / 3]
        self.masks = BlockMaskGenerator(num_patches_side, num_masked, min_num_patches=min_num_patches, variant="exact")

    def __call__(self, image: EncodedImage) -> dict[str, torch.Tensor]:
        top, left, h, w = v2.RandomResizedCrop.get_params(image.stand_in(), self.crop_scale, self.crop_ratio)
        flip = torch.rand(1) < 0.5
        return {"jpeg": image.tensor(),
                "crop_box": torch.tensor([top, left, h, w]), "flip": flip[0], "mask": self.masks()}


def collate_encoded(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack everything but the JPEG bytes, which are padded to the longest ([B, L] and their lengths [B])."""
    lengths = torch.tensor([len(item["jpeg"]) for item in items])
    jpeg = torch.zeros(len(items), int(lengths.max()), dtype=torch.uint8)
    for row, item in enumerate(items):
        jpeg[row, : len(item["jpeg"])] = item["jpeg"]
    rest = {key: torch.stack([item[key] for item in items]) for key in items[0] if key != "jpeg"}
    return {**rest, "jpeg": jpeg, "jpeg_length": lengths}


class DeviceViews:
    """The device half: decode the batch's JPEGs, then crop, resize, flip and normalise each into "image"; with a
    `tokenizer_size`, also CAE's DALL-E view of the same crop and flip, Lanczos-resized, in [0, 1]."""

    # Left in host memory by the trainer: decode_jpeg reads its input there, and the boxes and flips are read as
    # Python numbers (from the device that would be a synchronisation per batch).
    host_keys = ("jpeg", "jpeg_length", "crop_box", "flip")

    def __init__(self, image_size: int, tokenizer_size: int = 0) -> None:
        self.size, self.tokenizer_size = image_size, tokenizer_size

    def __call__(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        images = decode_all(batch.pop("jpeg"), batch.pop("jpeg_length").tolist(), device)
        batch["valid"] = torch.tensor([image is not None for image in images], device=device)
        boxes, flips = batch.pop("crop_box").tolist(), batch.pop("flip").tolist()
        images = [or_black(image, box, device) for image, box in zip(images, boxes, strict=True)]
        batch["image"] = torch.stack([normalize(crop(image, box, flip, self.size))
                                      for image, box, flip in zip(images, boxes, flips, strict=True)])
        if self.tokenizer_size > 0:
            batch["tokenizer_image"] = torch.stack([tokenizer_view(image, box, flip, self.tokenizer_size)
                                                    for image, box, flip in zip(images, boxes, flips, strict=True)])
        return batch


def to_device(batch: dict[str, torch.Tensor], device: torch.device, stage: Any = None) -> dict[str, torch.Tensor]:
    """A loader batch made ready for the objective: copied to `device` (non-blocking from pinned memory) except
    what the device stage reads in host memory, then passed through that stage (data.decode=gpu)."""
    host = getattr(stage, "host_keys", ())
    batch = {k: v if k in host else v.to(device, non_blocking=True) for k, v in batch.items()}
    return stage(batch, device) if stage is not None else batch


def or_black(image: torch.Tensor | None, box: list[int], device: torch.device) -> torch.Tensor:
    """A JPEG that did not decode stands as a black image just large enough for its box (drawn for the real
    size)."""
    if image is not None:
        return image
    return torch.zeros(3, box[0] + box[2], box[1] + box[3], dtype=torch.uint8, device=device)


def crop(image: torch.Tensor, box: list[int], flip: bool, size: int) -> torch.Tensor:
    """[3, size, size] uint8: the box (top, left, height, width) resized (bicubic, antialiased), then flipped."""
    top, left, height, width = box
    view = TF.resized_crop(image, top, left, height, width, [size, size], interpolation=InterpolationMode.BICUBIC,
                           antialias=True)
    return TF.horizontal_flip(view) if flip else view


def tokenizer_view(image: torch.Tensor, box: list[int], flip: bool, size: int) -> torch.Tensor:
    """CAETransform's tokenizer view: the crop at full resolution, flipped, PIL-Lanczos-resized, in [0, 1]."""
    top, left, height, width = box
    region = image[:, top: top + height, left: left + width]
    return lanczos_resize(TF.horizontal_flip(region) if flip else region, size).float() / 255


def normalize(image_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=image_uint8.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=image_uint8.device)[:, None, None]
    return (image_uint8.float() / 255 - mean) / std


def decode_all(jpeg: torch.Tensor, lengths: list[int], device: torch.device) -> list[torch.Tensor | None]:
    """[3, H, W] uint8 images on `device` (None where a JPEG does not decode): the batch in one call, or one by
    one when that call fails."""
    data = [jpeg[row, :length] for row, length in enumerate(lengths)]
    target = device if device.type == "cuda" else "cpu"
    try:
        return [image.to(device) for image in decode_jpeg(data, mode=ImageReadMode.RGB, device=target)]
    except RuntimeError:
        images = []
        for index, one in enumerate(data):
            try:
                images.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=target).to(device))
            except RuntimeError as exc:
                err_line(f"warning: a JPEG of this batch (row {index}) did not decode on {device}, replaced by a "
                         f"black image: {str(exc).splitlines()[0][:200]}")
                images.append(None)
        return images

