"""DINO multi-crop views on real JPEGs: shapes, normalisation, seeding, and the blur/solarise asymmetry."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch.utils.data import default_collate

from largessl.data import multicrop
from largessl.data.multicrop import MultiCropTransform, PILGaussianBlur
from largessl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

REPO = Path(__file__).resolve().parents[1]
JPEGS = sorted((REPO / "demo" / "imagenette-mini" / "train").rglob("*.JPEG"))[:4]
DRAWS = 200


def load(path: Path, size: int | None = None) -> Image.Image:
    with Image.open(path) as image:
        image = image.convert("RGB")
    return image.resize((size, size), Image.Resampling.BICUBIC) if size else image


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    assert len(JPEGS) == 4
    return [load(p) for p in JPEGS]


@pytest.fixture(scope="module")
def small_photo() -> Image.Image:
    return load(JPEGS[0], size=64)


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def seeded(transform, image: Image.Image, seed: int):
    torch.manual_seed(seed)
    return transform(image)


@pytest.mark.parametrize("num_local", [8, 0])
def test_views_have_the_documented_shapes_and_are_normalised(photos: list[Image.Image], num_local: int) -> None:
    transform = MultiCropTransform(global_size=64, local_size=32, num_local=num_local)
    for seed, photo in enumerate(photos):
        out = seeded(transform, photo, seed)
        assert set(out) == {"globals", "locals"}
        assert out["globals"].shape == (2, 3, 64, 64) and out["globals"].dtype == torch.float32
        assert out["locals"].shape == (num_local, 3, 32, 32) and out["locals"].dtype == torch.float32
        for views in out.values():
            if views.numel():
                assert views.min() < 0 and views.max() > 1  # normalised, not just scaled to [0, 1]
                pixels = unnormalize(views)
                assert pixels.min() >= -1e-3 and pixels.max() <= 1 + 1e-3  # bicubic may overshoot by rounding only
    assert not torch.equal(out["globals"][0], out["globals"][1])  # two different crops of the same image


def test_empty_locals_still_collate(small_photo: Image.Image) -> None:
    transform = MultiCropTransform(global_size=32, local_size=16, num_local=0)
    batch = default_collate([seeded(transform, small_photo, s) for s in range(3)])
    assert batch["globals"].shape == (3, 2, 3, 32, 32)
    assert batch["locals"].shape == (3, 0, 3, 16, 16)


def test_negative_num_local_is_rejected() -> None:
    with pytest.raises(ValueError, match="num_local"):
        MultiCropTransform(global_size=32, local_size=16, num_local=-1)


def test_same_torch_seed_gives_identical_views_whatever_python_and_numpy_rngs_do(photos: list[Image.Image]) -> None:
    transform = MultiCropTransform(global_size=48, local_size=24, num_local=4)
    random.seed(1)
    np.random.seed(1)
    first = seeded(transform, photos[1], 123)
    random.seed(2)  # if any choice came from Python's or numpy's RNG, these would change the output
    np.random.seed(2)
    again = seeded(transform, photos[1], 123)
    other = seeded(transform, photos[1], 124)
    for key in first:
        assert torch.equal(first[key], again[key])
        assert not torch.equal(first[key], other[key])


def test_pil_blur_probability_and_effect(small_photo: Image.Image) -> None:
    torch.manual_seed(0)
    assert PILGaussianBlur(p=0.0)(small_photo) is small_photo
    blurred = np.asarray(PILGaussianBlur(p=1.0, radius_min=1.5, radius_max=2.0)(small_photo), dtype=np.float64)
    original = np.asarray(small_photo, dtype=np.float64)
    assert blurred.shape == original.shape
    assert np.abs(blurred - original).mean() > 1.0
    # Blurring removes high-frequency detail: neighbouring pixels get closer.
    assert np.abs(np.diff(blurred, axis=1)).mean() < 0.8 * np.abs(np.diff(original, axis=1)).mean()


def count_blurs(monkeypatch: pytest.MonkeyPatch, view, image: Image.Image) -> tuple[int, list[float]]:
    """Run one view DRAWS times under fixed seeds; return how often it blurred and with which radii."""
    radii: list[float] = []

    def recording_blur(radius: float) -> ImageFilter.GaussianBlur:
        radii.append(radius)
        return ImageFilter.GaussianBlur(radius=radius)

    monkeypatch.setattr(multicrop, "ImageFilter", SimpleNamespace(GaussianBlur=recording_blur))
    for seed in range(DRAWS):
        torch.manual_seed(seed)
        view(image)
    monkeypatch.undo()
    return len(radii), radii


def test_blur_is_asymmetric_between_views(monkeypatch: pytest.MonkeyPatch, small_photo: Image.Image) -> None:
    transform = MultiCropTransform(global_size=32, local_size=16, num_local=1)
    always, radii = count_blurs(monkeypatch, transform.global_views[0], small_photo)
    rarely, _ = count_blurs(monkeypatch, transform.global_views[1], small_photo)
    half, _ = count_blurs(monkeypatch, transform.local_view, small_photo)
    assert always == DRAWS
    assert 5 <= rarely <= 40  # p 0.1: expect 20
    assert 70 <= half <= 130  # p 0.5: expect 100
    assert 0.1 <= min(radii) and max(radii) <= 2.0
    assert max(radii) - min(radii) > 1.0  # the radius really is random


def test_only_the_second_global_view_is_solarised() -> None:
    # White stays a uniform colour >= 0.6 after jitter (brightness >= 0.6), grayscale and blur; solarising
    # at 128 inverts it to <= 0.4, so each view is either all bright or all dark.
    white = Image.new("RGB", (64, 64), "white")
    transform = MultiCropTransform(global_size=32, local_size=16, num_local=2)
    dark = {"global 1": 0, "global 2": 0, "locals": 0}
    for seed in range(DRAWS):
        out = seeded(transform, white, seed)
        views = {"global 1": out["globals"][:1], "global 2": out["globals"][1:], "locals": out["locals"]}
        for name, batch in views.items():
            for pixels in unnormalize(batch):
                is_dark = bool(pixels.max() < 0.45)
                assert is_dark or pixels.min() > 0.55
                dark[name] += is_dark
    assert dark["global 1"] == 0 and dark["locals"] == 0
    assert 20 <= dark["global 2"] <= 60  # p 0.2: expect 40
