"""The GPU input path (`data.decode: gpu`; MAE and CAE here, DINO and SIM in data/gpu_views.py): workers draw
the augmentation, the device decodes and applies it.

On the CPU path a DataLoader worker decodes each JPEG and augments it (data/transforms.py). At MAE ViT-B speeds that
is the bottleneck (../shared/docs/performance.md section 5), so here the worker only checks the JPEG (without
decoding it, below), draws the sample's random parameters from the same per-sample seed in the same order as the
CPU transform (the crop box, the flip, the mask noise), and passes the JPEG bytes on. The trainer's device stage
then decodes the batch in one call (torchvision's `decode_jpeg`, nvJPEG on a GPU) and crops, resizes (bicubic,
antialiased), flips and normalises each image on the device. Same parameters, same crops: the pixels differ from
the CPU path's only by the two resize kernels (PIL's and torch's bicubic), which the tests bound.

The worker's check is the CPU path's (data/jpeg_check.py): a sample whose header claims more pixels than Pillow's
MAX_IMAGE_PIXELS, that is not an RGB or greyscale Huffman-coded JPEG, or whose structure is broken anywhere (scan
data included) is skipped and counted before anything is decoded or allocated for it, so both paths skip the same
samples. What still fails to decode on the device (a decoder stricter than libjpeg) is decoded again alone, then by
Pillow on the host, the CPU path's decoder. A row that fails there too (a gap in the check: it never happens on the
tests' hostile shards) is replaced by a copy of a decodable row of the batch, marked `valid` false, reported and
counted in `data/corrupt_images`; no black image is trained on.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from largessl.console import err_line
from largessl.data.gpu_colour import lanczos_resize
from largessl.data.jpeg_check import checked_jpeg, first_line, host_decode
from largessl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from largessl.errors import DataError


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
    def read(cls, sample: dict[str, Any]) -> EncodedImage | str:
        """The sample's checked JPEG (data/jpeg_check.py, as on the CPU path), or the reason it is skipped."""
        checked = checked_jpeg(sample)
        return checked if isinstance(checked, str) else cls(checked[0], *checked[1])

    @classmethod
    def of(cls, sample: dict[str, Any]) -> EncodedImage | None:
        """`read`, with None for a refused sample."""
        image = cls.read(sample)
        return None if isinstance(image, str) else image


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


class DecodingStage:
    """What the device stages share: decoding the batch's JPEGs, with rows that decode nowhere stood in for."""

    covered = 0  # rows replaced by another row of their batch (counted in data/corrupt_images)

    def decoded(self, batch: dict[str, torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """[3, H, W] uint8 images on `device`, one per row; sets batch["valid"]."""
        images = decode_all(batch.pop("jpeg"), batch.pop("jpeg_length").tolist(), device)
        self.covered += images.count(None)
        return replace_undecoded(batch, images, device)


class DeviceViews(DecodingStage):
    """The device half: decode the batch's JPEGs, then crop, resize, flip and normalise each into "image"; with a
    `tokenizer_size`, also CAE's DALL-E view of the same crop and flip, Lanczos-resized, in [0, 1]."""

    # Left in host memory by the trainer: decode_jpeg reads its input there, and the boxes and flips are read as
    # Python numbers (from the device that would be a synchronisation per batch).
    host_keys = ("jpeg", "jpeg_length", "crop_box", "flip")

    def __init__(self, image_size: int, tokenizer_size: int = 0) -> None:
        self.size, self.tokenizer_size = image_size, tokenizer_size

    def __call__(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        images = self.decoded(batch, device)
        boxes, flips = batch.pop("crop_box").tolist(), batch.pop("flip").tolist()
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


def covered_rows(stage: Any) -> int:
    """Rows the device stage replaced so far (0 without one): the trainer adds them to data/corrupt_images."""
    return getattr(stage, "covered", 0)


def replace_undecoded(batch: dict[str, torch.Tensor], images: list[torch.Tensor | None],
                      device: torch.device) -> list[torch.Tensor]:
    """The images, where a row decoded nowhere (None) a copy of the first decodable row: its image and every
    per-sample key (its crops, masks and label), marked `valid` false. A batch with no decodable row stops the
    run in one line."""
    valid = [image is not None for image in images]
    batch["valid"] = torch.tensor(valid, device=device)
    if not any(valid):
        raise DataError(f"none of the {len(images)} JPEGs of a batch decodes on {device} or with Pillow, although "
                        "the worker's check passed them; data.decode=cpu skips them")
    donor = valid.index(True)
    for row in (row for row, ok in enumerate(valid) if not ok):
        for key, value in batch.items():
            if key != "valid" and value.dim() and len(value) == len(images):  # the per-sample keys
                value[row] = value[donor]
        err_line(f"warning: a JPEG of this batch (row {row}) passed the worker's check but decodes neither on "
                 f"{device} nor with Pillow; row {donor}'s sample stands in for it (counted in data/corrupt_images)")
    return [image if image is not None else images[donor] for image in images]


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
    """[3, H, W] uint8 images on `device` (None where a JPEG decodes nowhere): the batch in one call, or one by
    one when that call fails."""
    data = [jpeg[row, :length] for row, length in enumerate(lengths)]
    target = device if device.type == "cuda" else "cpu"
    try:
        return [image.to(device) for image in decode_jpeg(data, mode=ImageReadMode.RGB, device=target)]
    except RuntimeError:
        return [decode_one(one, row, target, device) for row, one in enumerate(data)]


def decode_one(data: torch.Tensor, row: int, target: Any, device: torch.device) -> torch.Tensor | None:
    """One JPEG on `target`; failing that, by Pillow on the host (the CPU path's decoder: its pixels are what the
    CPU path trains on); None when neither decodes it."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=target).to(device)
    except RuntimeError as exc:
        image = host_decode(data.numpy().tobytes())
        outcome = "does not decode with Pillow either" if isinstance(image, str) else "decoded by Pillow instead"
        err_line(f"warning: a JPEG of this batch (row {row}) did not decode on {device} "
                 f"({first_line(exc)}); {outcome}")
        return None if isinstance(image, str) else TF.pil_to_tensor(image).to(device)
