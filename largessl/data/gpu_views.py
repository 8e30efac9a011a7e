"""The GPU input path of the two methods with colour augmentation: DINO's multi-crop (data/multicrop.py) and
SIM's two views (data/siamese.py).

As for MAE and CAE (data/gpu_decode.py), a DataLoader worker reads only the JPEG's header and makes the sample's
random draws from its seed in the CPU transform's order; the trainer's device stage decodes the batch once and
renders every view on the device. A view is a box (top, left, height, width) in the source image, cropped and
resized (bicubic, antialiased), then flipped if its flag says so, then coloured with its own ColourDraw parameters
(data/gpu_colour.py), then normalised. DINO draws exactly those per view (crop, flip, colour). SIM flips the whole
image before it crops, so its worker turns a box drawn in the mirrored frame into the mirrored box in the source
(left -> W - left - width) and keeps the drawn boxes for the relative geometry.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from largessl.data.gpu_colour import ColourDraw, apply_colour
from largessl.data.gpu_decode import DecodingStage, EncodedImage, crop, normalize
from largessl.data.masking import BlockMaskGenerator
from largessl.data.siamese import CROP_RATIO, ViewBox, relative_geometry


class DINOEncodedTransform:
    """The worker half of MultiCropTransform: for each global view, then each local view, its RandomResizedCrop
    box, its flip and its colour draws ("global_boxes" [2, 5], "local_boxes" [L, 5] as top, left, height, width,
    flip; "global_colour" [2, PARAMS], "local_colour" [L, PARAMS])."""

    def __init__(self, *, global_size: int, local_size: int, num_local: int, global_scale: tuple[float, float],
                 local_scale: tuple[float, float]) -> None:
        self.global_crop = v2.RandomResizedCrop(global_size, scale=global_scale)
        self.local_crop = v2.RandomResizedCrop(local_size, scale=local_scale)
        self.global_colour = [ColourDraw(blur_p=1.0), ColourDraw(blur_p=0.1, solarize_p=0.2)]
        self.local_colour, self.num_local = ColourDraw(blur_p=0.5), num_local

    def view(self, crop_: v2.RandomResizedCrop, colour: ColourDraw, source: torch.Tensor) -> tuple[list, torch.Tensor]:
        box = crop_.make_params([source])
        flip = float(torch.rand(1) < 0.5)  # RandomHorizontalFlip
        return [box["top"], box["left"], box["height"], box["width"], flip], colour()

    def __call__(self, image: EncodedImage) -> dict[str, torch.Tensor]:
        source = image.stand_in()
        views = [self.view(self.global_crop, colour, source) for colour in self.global_colour]
        views += [self.view(self.local_crop, self.local_colour, source) for _ in range(self.num_local)]
        boxes = torch.tensor([box for box, _ in views]).reshape(-1, 5)
        colour = torch.stack([params for _, params in views])
        return {"jpeg": image.tensor(), "global_boxes": boxes[:2], "local_boxes": boxes[2:],
                "global_colour": colour[:2], "local_colour": colour[2:]}


class SIMEncodedTransform:
    """The worker half of SIMTransform: flip 1, flip 2, box 1, box 2, colour 1, colour 2, mask, in that order;
    "boxes" [2, 5] in the source frame (crop, then flip), "geometry" from the boxes as drawn."""

    def __init__(self, grid_size: int, num_masked: int, *, crop_scale: tuple[float, float],
                 min_num_patches: int) -> None:
        self.crop_scale = list(crop_scale)
        self.colour = [ColourDraw(blur_p=1.0), ColourDraw(blur_p=0.1, solarize_p=0.2)]
        self.masks = BlockMaskGenerator(grid_size, num_masked, min_num_patches=min_num_patches, variant="top_up")

    def __call__(self, image: EncodedImage) -> dict[str, torch.Tensor]:
        width = image.size[0]
        flips = [torch.rand(1).item() < 0.5 for _ in range(2)]
        drawn = [ViewBox(flip, *v2.RandomResizedCrop.get_params(image.stand_in(), self.crop_scale, list(CROP_RATIO)))
                 for flip in flips]
        colour = torch.stack([draw() for draw in self.colour])
        boxes = [[box.top, width - box.left - box.width if box.flip else box.left, box.height, box.width,
                  float(box.flip)] for box in drawn]
        return {"jpeg": image.tensor(), "boxes": torch.tensor(boxes), "colour": colour, "mask": self.masks(),
                "geometry": relative_geometry(drawn[0], drawn[1], width)}


def render(images: list[torch.Tensor], boxes: torch.Tensor, colour: torch.Tensor, size: int) -> torch.Tensor:
    """[B, V, 3, size, size] normalised views: image b's box v cropped, resized, flipped, coloured."""
    count, views = boxes.shape[:2]
    if views == 0:
        return torch.empty(count, 0, 3, size, size, device=images[0].device)
    crops = [crop(image, [int(v) for v in box[:4]], bool(box[4]), size)
             for image, image_boxes in zip(images, boxes.tolist(), strict=True) for box in image_boxes]
    coloured = apply_colour(torch.stack(crops).float() / 255, colour.flatten(0, 1))
    return normalize(coloured * 255).reshape(count, views, 3, size, size)


class RenderedViews(DecodingStage):
    """The device half for DINO and SIM: decode the batch, then render each group of views (the batch key of its
    boxes and of its colour parameters -> its output key and size); rows as DecodingStage makes them."""

    def __init__(self, groups: dict[str, tuple[str, str, int]], split: dict[str, tuple[str, ...]] | None = None
                 ) -> None:
        self.groups, self.split = groups, split or {}
        # left in host memory: what decode_jpeg, the crops and the colour operations read there (DeviceViews)
        self.host_keys = ("jpeg", "jpeg_length", *groups, *(colour for colour, _, _ in groups.values()))

    def __call__(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        images = self.decoded(batch, device)
        for boxes_key, (colour_key, out_key, size) in self.groups.items():
            batch[out_key] = render(images, batch.pop(boxes_key), batch.pop(colour_key), size)
        for key, names in self.split.items():  # SIM: "views" [B, 2, ...] -> "view1", "view2"
            batch.update(zip(names, batch.pop(key).unbind(1), strict=True))
        return batch


def dino_device_views(global_size: int, local_size: int) -> RenderedViews:
    return RenderedViews({"global_boxes": ("global_colour", "globals", global_size),
                          "local_boxes": ("local_colour", "locals", local_size)})


def sim_device_views(image_size: int) -> RenderedViews:
    return RenderedViews({"boxes": ("colour", "views", image_size)}, split={"views": ("view1", "view2")})
