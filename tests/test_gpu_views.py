"""The GPU input path of DINO, SIM and CAE's DALL-E view (data/gpu_views.py, data/gpu_colour.py), run here with
device=cpu: the worker makes exactly the CPU transform's draws (the same RNG state afterwards, the same masks and
geometry), the batched colour operations equal torchvision's one-image kernels, and the rendered views match the
CPU path's to within the difference of 8-bit PIL and float32 kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_gpu_decode import raw_samples
from torchvision.transforms.v2 import functional as F

from largessl.data.gpu_colour import FACTORS, GREY, ORDER, PARAMS, RADIUS, SOLARIZE, ColourDraw, apply_colour
from largessl.data.gpu_decode import CAEEncodedTransform, DeviceViews, EncodedImage, collate_encoded
from largessl.data.gpu_views import (
    DINOEncodedTransform,
    SIMEncodedTransform,
    dino_device_views,
    sim_device_views,
)
from largessl.data.loader import decode_image
from largessl.data.multicrop import MultiCropTransform
from largessl.data.siamese import SIMTransform
from largessl.data.transforms import CAETransform
from largessl.rng import seed_everything

SIZE, LOCAL = 64, 32
CPU = torch.device("cpu")


def one_view_reference(image: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """torchvision's float kernels, one after another, for one view's parameters (blur left out)."""
    adjust = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    if params[0] > 0:
        for op in params[ORDER].long().tolist():
            image = adjust[op](image, float(params[FACTORS][op]))
    if params[GREY] > 0:
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    return F.solarize(image, 128 / 255) if params[SOLARIZE] > 0 else image


def test_batched_colour_equals_torchvisions_kernels_view_by_view() -> None:
    torch.manual_seed(0)
    images = torch.rand(24, 3, 20, 20)
    draws = [ColourDraw(blur_p=0.0, solarize_p=0.5)() for _ in range(24)]
    params = torch.stack(draws)
    assert params[:, 0].sum() > 10 and params[:, GREY].sum() > 0 and params[:, SOLARIZE].sum() > 0
    assert len({tuple(p[ORDER].tolist()) for p in draws}) > 5  # several orders of the four operations
    ours = apply_colour(images, params)
    reference = torch.stack([one_view_reference(image, p) for image, p in zip(images, params, strict=True)])
    assert (ours - reference).abs().max() < 1e-4


def test_the_blur_is_a_gaussian_of_the_drawn_radius() -> None:
    torch.manual_seed(1)
    images = torch.rand(4, 3, 40, 40)
    params = torch.zeros(4, PARAMS)
    params[:, ORDER], params[:, 10], params[:, RADIUS] = torch.arange(4.0), 1.0, torch.tensor([0.3, 0.9, 1.5, 2.0])
    params[:, FACTORS] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    ours = apply_colour(images, params)
    for view, radius in enumerate(params[:, RADIUS].tolist()):
        half = 6  # the batch's kernel: 3 x the largest radius each side
        reference = F.gaussian_blur(images[view], [2 * half + 1] * 2, [radius, radius])
        inner = (slice(None), slice(half, -half), slice(half, -half))  # the two differ only in edge padding
        assert (ours[view][inner] - reference[inner]).abs().max() < 1e-5, radius


def same_rng_after(cpu: object, worker: object, image: object, encoded: EncodedImage, seed: int
                   ) -> tuple[dict, dict]:
    seed_everything(seed)
    cpu_out = cpu(image)
    state = torch.get_rng_state()
    seed_everything(seed)
    worker_out = worker(encoded)
    assert torch.equal(state, torch.get_rng_state())  # the worker consumed exactly the CPU transform's draws
    return cpu_out, worker_out


def normalised_levels(difference: torch.Tensor) -> torch.Tensor:
    return difference * 0.225 * 255  # back to grey levels of 255


@pytest.mark.parametrize("method", ["sim", "dino"])
def test_the_views_match_the_cpu_paths(mini_shards: Path, method: str) -> None:
    if method == "sim":
        cpu, worker = SIMTransform(SIZE, 4, 6, min_num_patches=2), SIMEncodedTransform(4, 6, crop_scale=(0.08, 1.0),
                                                                                         min_num_patches=2)
        device, keys = sim_device_views(SIZE), ["view1", "view2"]
    else:
        options = dict(global_size=SIZE, local_size=LOCAL, num_local=3, global_scale=(0.4, 1.0),
                       local_scale=(0.05, 0.4))
        cpu, worker = MultiCropTransform(**options), DINOEncodedTransform(**options)
        device, keys = dino_device_views(SIZE, LOCAL), ["globals", "locals"]
    cpu_views, items = [], []
    for number, sample in enumerate(raw_samples(mini_shards)):
        cpu_out, item = same_rng_after(cpu, worker, decode_image(sample), EncodedImage.of(sample), 200 + number)
        if method == "sim":
            assert torch.equal(cpu_out["mask"], item["mask"]) and torch.equal(cpu_out["geometry"], item["geometry"])
        cpu_views.append(cpu_out)
        items.append(item)
    batch = device(collate_encoded(items), CPU)
    assert bool(batch["valid"].all())
    for key in keys:
        expected = torch.stack([views[key] for views in cpu_views])
        assert batch[key].shape == expected.shape, key
        levels = normalised_levels((batch[key] - expected).abs())
        # 8-bit PIL (rounding each step, box-blur Gaussian, 8-bit hue) against float32: measured 0.8-1.3 grey
        # levels on average, 99th percentile 3-4.5
        assert levels.mean() < 2 and levels.quantile(0.99) < 8, (key, levels.mean(), levels.quantile(0.99))
        shuffled = normalised_levels((batch[key] - expected.roll(1, 0)).abs())  # other images: the check can tell
        assert shuffled.mean() > 20


def test_caes_tokenizer_view_is_pils_lanczos_of_the_same_crop(mini_shards: Path) -> None:
    cpu = CAETransform(SIZE, 4, 6, tokenizer_size=32, min_num_patches=2)
    worker = CAEEncodedTransform(4, 6, (0.08, 1.0), min_num_patches=2)
    pairs = [same_rng_after(cpu, worker, decode_image(sample), EncodedImage.of(sample), 300 + number)
             for number, sample in enumerate(raw_samples(mini_shards))]
    batch = DeviceViews(SIZE, tokenizer_size=32)(collate_encoded([item for _, item in pairs]), CPU)
    expected = torch.stack([cpu_out["tokenizer_image"] for cpu_out, _ in pairs])
    assert batch["tokenizer_image"].shape == expected.shape == (8, 3, 32, 32)
    levels = (batch["tokenizer_image"] - expected).abs() * 255
    # PIL rounds its fixed-point weights: a level or two at a few pixels, nothing on average
    assert levels.max() <= 2.01 and levels.mean() < 0.05, (levels.max(), levels.mean())
    assert torch.equal(batch["mask"], torch.stack([cpu_out["mask"] for cpu_out, _ in pairs]))


def test_a_method_without_a_gpu_path_is_refused_in_one_line() -> None:
    from largessl.errors import UserError
    from largessl.objectives import objective_class

    with pytest.raises(UserError, match="data.decode=gpu: linear has no GPU input path"):
        objective_class("linear").input_transforms(None, None, "gpu")


def test_a_view_whose_jpeg_decodes_nowhere_takes_another_rows_views(mini_shards: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """DINO's and SIM's device stage share the MAE one's decoding (test_gpu_decode.py): a row that decodes neither
    on the device nor with Pillow takes a decodable row's views, draws and label, marked valid false."""
    from largessl.data import gpu_decode

    samples = raw_samples(mini_shards, 3)
    worker = SIMEncodedTransform(4, 6, crop_scale=(0.08, 1.0), min_num_patches=2)
    seed_everything(7)
    items = [worker(EncodedImage.of(sample)) for sample in samples]

    def device_fails(*_: object, **__: object) -> None:
        raise RuntimeError("not on this device")

    monkeypatch.setattr(gpu_decode, "decode_jpeg", device_fails)  # every row goes to Pillow, the last fails there
    monkeypatch.setattr(gpu_decode, "host_decode", lambda data: "no" if data == samples[2]["jpg"] else
                        decode_image({"jpg": data}))
    stage = sim_device_views(SIZE)
    batch = stage(collate_encoded(items), CPU)
    assert batch["valid"].tolist() == [True, True, False] and stage.covered == 1
    for key in ("view1", "view2", "mask", "geometry"):
        assert torch.equal(batch[key][2], batch[key][0]) and not torch.equal(batch[key][1], batch[key][0]), key
