"""One input file -> the RGB JPEG a shard stores, or a rejection with a reason.

A JPEG that is already RGB, upright and within `max_size` is copied byte for byte after a decode at 1/8 scale
(which reads every entropy-coded block, so it catches truncated and corrupt files). Everything else that decodes is
converted: EXIF orientation applied, alpha composited onto white, shrunk so the short side is `max_size` (never
enlarged), and encoded at `quality`. An image with more pixels than `max_pixels` (counted from the header, after
draft mode's reduction for JPEGs that are shrunk) is rejected before any pixel is decoded.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from data_tools.limits import DEFAULT_MAX_PIXELS

EXIF_ORIENTATION = 0x0112
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class Rejected(Exception):
    """An input that cannot become a sample; `reason` is the short category counted in the summary."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Prepared:
    jpeg: bytes
    width: int
    height: int
    copied: bool  # the input bytes themselves, not a re-encode


def prepare(data: bytes, *, max_size: int | None, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Prepared:
    if not data:
        raise Rejected("empty file")
    try:
        image = open_header(data)
    except UnidentifiedImageError:
        raise Rejected("not an image") from None
    except Exception as exc:  # Pillow raises many types on hostile headers; one file must never stop a run
        raise Rejected("corrupt image", str(exc)) from None
    with image:
        try:
            return _prepare_open(image, data, max_size, quality, max_pixels)
        except Rejected:
            raise
        except Image.DecompressionBombError as exc:  # Pillow's own check of GIF frames and the like, while loading
            raise Rejected("too many pixels", str(exc)) from None
        except Exception as exc:
            raise Rejected("corrupt image", f"{type(exc).__name__}: {exc}") from None


def open_header(data: bytes) -> Image.Image:
    """Image.open (the header only) without Pillow's pixel limit, which would refuse a huge JPEG before draft
    mode could decode it small; `check_pixels` applies --max-pixels to what is actually decoded instead."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        return Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def check_pixels(image: Image.Image, max_pixels: int, what: str) -> None:
    """Rejected before any pixel is decoded when `image.size` (after draft) exceeds the cap."""
    width, height = image.size
    if width * height > max_pixels:
        raise Rejected("too many pixels", f"{width} x {height} {what}, over --max-pixels {max_pixels:,}")


def _prepare_open(image: Image.Image, data: bytes, max_size: int | None, quality: int, max_pixels: int) -> Prepared:
    width, height = image.size
    shrink = max_size is not None and min(width, height) > max_size
    upright = image.getexif().get(EXIF_ORIENTATION, 1) == 1
    if image.format == "JPEG" and image.mode == "RGB" and upright and not shrink:
        check_pixels(image, max_pixels, "stored at full size")  # a reader decodes it whole
        # A 1/8-scale decode still entropy-decodes every block, so it fails on truncated or corrupt data like a
        # full decode does, at about half the cost (the inverse DCT and colour conversion shrink 64-fold).
        image.draft("RGB", (math.ceil(width / 8), math.ceil(height / 8)))
        image.load()
        return Prepared(data, width, height, copied=True)
    if shrink and image.format == "JPEG":
        # DCT-domain downscale while decoding: a 4000 px JPEG decodes at 1/8 cost when only 256 px are kept
        scale = max_size / min(width, height)
        image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
    check_pixels(image, max_pixels, "to decode" if shrink else "stored at full size")
    image.load()
    rgb = to_rgb(ImageOps.exif_transpose(image))
    if shrink:
        rgb = shrink_short_side(rgb, max_size)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality)
    return Prepared(buffer.getvalue(), rgb.width, rgb.height, copied=False)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels become white (not the arbitrary colour stored under alpha 0)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def shrink_short_side(image: Image.Image, max_size: int) -> Image.Image:
    width, height = image.size
    if min(width, height) <= max_size:
        return image
    import torchvision.transforms.v2.functional as F  # here: torch is for resizing only (see writing.worker_pool)

    scale = max_size / min(width, height)
    size = (max_size, max(1, round(height * scale))) if width <= height else (max(1, round(width * scale)), max_size)
    # torchvision's antialiased bicubic on uint8 matches Pillow's filter and runs about 6x faster on x86 (SIMD)
    resized = F.resize(F.pil_to_tensor(image), [size[1], size[0]], interpolation=F.InterpolationMode.BICUBIC,
                       antialias=True)
    return F.to_pil_image(resized)
