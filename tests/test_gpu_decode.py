"""The GPU input path (data.decode=gpu, data/gpu_decode.py), run here with device=cpu: the same per-sample draws as
the CPU path (crop box, flip, then MAE's mask noise or CAE's block mask), the same crops to within the two bicubic
kernels, corrupt JPEGs skipped or blacked out, and MAE training through it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_largessl
from PIL import Image
from test_train import ok

from largessl.data.gpu_decode import (
    CAEEncodedTransform,
    DeviceViews,
    EncodedImage,
    MAEEncodedTransform,
    collate_encoded,
)
from largessl.data.index import open_split
from largessl.data.loader import decode_image
from largessl.data.stream import read_range
from largessl.data.transforms import CAETransform, MAETransform
from largessl.rng import seed_everything

SIZE, PATCHES = 96, 36
CPU = torch.device("cpu")


def raw_samples(shards: Path, count: int = 8) -> list[dict]:
    index = open_split(str(shards), "train")
    return list(read_range(list(index.shards), 0, index.num_samples))[::60][:count]


PATHS = {  # method: (CPU transform, worker half, the key drawn last, after the box and the flip)
    "mae": (lambda: MAETransform(SIZE, (0.2, 1.0), PATCHES),
            lambda: MAEEncodedTransform(SIZE, (0.2, 1.0), PATCHES), "mask_noise"),
    "cae": (lambda: CAETransform(SIZE, 6, 18, (0.08, 1.0), min_num_patches=4),
            lambda: CAEEncodedTransform(6, 18, (0.08, 1.0), min_num_patches=4), "mask"),
}


def both_paths(method: str, sample: dict, seed: int, seed_gpu: int | None = None) -> tuple[dict, dict]:
    cpu_transform, worker, _ = PATHS[method]
    seed_everything(seed)
    cpu = cpu_transform()(decode_image(sample))
    seed_everything(seed if seed_gpu is None else seed_gpu)
    gpu = DeviceViews(SIZE)(collate_encoded([worker()(EncodedImage.of(sample))]), CPU)
    return cpu, {key: value[0] for key, value in gpu.items()}


@pytest.mark.parametrize("method", list(PATHS))
def test_same_draws_and_the_same_crops_as_the_cpu_path(mini_shards: Path, method: str) -> None:
    differences, last = [], PATHS[method][2]
    for number, sample in enumerate(raw_samples(mini_shards)):
        cpu, gpu = both_paths(method, sample, seed=100 + number)
        assert torch.equal(cpu[last], gpu[last])  # drawn after the box and the flip: the same order of draws
        assert gpu["image"].shape == cpu["image"].shape == (3, SIZE, SIZE) and bool(gpu["valid"])
        differences.append((gpu["image"] - cpu["image"]).abs())
        _, other = both_paths(method, sample, seed=100 + number, seed_gpu=7)  # another box: the check can tell
        assert (other["image"] - cpu["image"]).abs().mean() > 0.2
    every = torch.stack(differences)
    # PIL's and torch's antialiased bicubic differ by about a grey level (1/255/0.225 = 0.017 after normalising)
    assert every.mean() < 0.02 and every.quantile(0.999) < 0.2, (every.mean(), every.max())


def jpeg_bytes(image: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", **options)
    return out.getvalue()


def test_what_the_worker_cannot_pass_on_is_refused_and_a_bad_body_becomes_black() -> None:
    photo = Image.effect_mandelbrot((64, 48), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    good, grey = jpeg_bytes(photo), jpeg_bytes(photo.convert("L"))
    png = io.BytesIO()
    photo.save(png, format="PNG")
    cmyk = jpeg_bytes(photo.convert("CMYK"))
    for data in (good[: len(good) // 2], png.getvalue(), cmyk, b"\xff\xd8junk\xff\xd9"):
        assert EncodedImage.of({"jpg": data}) is None
    assert EncodedImage.of({"jpg": grey}).size == EncodedImage.of({"jpg": good}).size == (64, 48)
    scan = good.index(b"\xff\xda")  # no start of scan: a header and an end marker, nothing to decode
    broken = good[:scan] + b"\xff\xd9"
    assert decode_image({"jpg": broken}) is None  # the CPU path skips it; the device stage blacks it out
    items = [MAEEncodedTransform(32, (1.0, 1.0), 4)(EncodedImage.of({"jpg": data})) for data in (good, broken, grey)]
    batch = DeviceViews(32)(collate_encoded(items), CPU)
    assert batch["valid"].tolist() == [True, False, True] and batch["image"].shape == (3, 3, 32, 32)
    black = (torch.zeros(3, 1, 1) - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(batch["image"][1], black.expand(3, 32, 32), atol=1e-5)
    assert batch["image"][2].std() > 0.1  # the greyscale JPEG decodes as RGB


@pytest.mark.slow  # ~45 s each: two short trainings
@pytest.mark.parametrize("method", ["mae", "sim", "dino"])
def test_training_through_the_gpu_path_gives_the_cpu_paths_losses(mini_shards: Path, tmp_path: Path,
                                                                  method: str) -> None:
    base = ["pretrain", "--config", f"debug/{method}_vit_tiny", f"data.train={mini_shards}",
            f"data.val={mini_shards}", "trainer.max_steps=3", "trainer.log_every=1", "eval.knn_every=0",
            "data.num_workers=1", "data.shuffle_buffer=20", "tracking.enabled=false", "distributed.precision=fp32"]
    ok(run_largessl([*base, "run.name=cpu"], tmp_path))
    ok(run_largessl([*base, "run.name=gpu", "data.decode=gpu"], tmp_path))
    cpu, gpu = read_metrics(tmp_path / "runs" / "cpu"), read_metrics(tmp_path / "runs" / "gpu")
    assert sorted(gpu) == [1, 2, 3]
    for step in cpu:  # the same samples, crops and masks: losses within the kernels' difference
        assert gpu[step]["loss"] == pytest.approx(cpu[step]["loss"], rel=2e-2), step
