"""The GPU input path (data.decode=gpu, data/gpu_decode.py), run here with device=cpu: the same per-sample draws as
the CPU path (crop box, flip, then MAE's mask noise or CAE's block mask), the same crops to within the two bicubic
kernels, what the worker refuses refused by the CPU path too, a JPEG the device cannot decode decoded by Pillow or
stood in for by another row (never a black image), and MAE training through it (hostile shards through both paths:
test_gpu_input_hostile.py)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_largessl
from PIL import Image
from test_train import ok

from largessl.data import gpu_decode
from largessl.data.gpu_decode import (
    CAEEncodedTransform,
    DeviceViews,
    EncodedImage,
    MAEEncodedTransform,
    collate_encoded,
    covered_rows,
)
from largessl.data.index import open_split
from largessl.data.loader import decode_image, read_image
from largessl.data.stream import read_range
from largessl.data.transforms import CAETransform, MAETransform
from largessl.errors import DataError
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


def test_the_worker_refuses_what_the_cpu_path_refuses_with_the_same_reason() -> None:
    photo = Image.effect_mandelbrot((64, 48), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    good, grey = jpeg_bytes(photo), jpeg_bytes(photo.convert("L"))
    png = io.BytesIO()
    photo.save(png, format="PNG")
    scan = good.index(b"\xff\xda")  # a header and an end marker, no scan: nothing to decode
    refused = {"half": good[: len(good) // 2], "png": png.getvalue(), "cmyk": jpeg_bytes(photo.convert("CMYK")),
               "junk": b"\xff\xd8junk\xff\xd9", "no scan": good[:scan] + b"\xff\xd9", "trailer": good + bytes(65)}
    for name, data in refused.items():
        reason = EncodedImage.read({"jpg": data})
        assert isinstance(reason, str) and reason == read_image({"jpg": data}), name
    assert EncodedImage.read({"png": png.getvalue()}) == read_image({"png": png.getvalue()}) == "no .jpg member"
    assert EncodedImage.of({"jpg": grey}).size == EncodedImage.of({"jpg": good + bytes(64)}).size == (64, 48)
    assert read_image({"jpg": grey}).size == (64, 48)


def failing_decoder(monkeypatch: pytest.MonkeyPatch, bad: bytes) -> None:
    """decode_jpeg as a stricter device decoder would be: it fails on `bad` (and on any batch holding it)."""
    real = gpu_decode.decode_jpeg

    def decode(data: object, *args: object, **kwargs: object) -> object:
        if any(bytes(row.numpy()) == bad for row in (data if isinstance(data, list) else [data])):
            raise RuntimeError("nvjpeg: status 6\nmore detail")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", decode)


def three_rows(size: int = 32) -> tuple[list[bytes], dict[str, torch.Tensor]]:
    photo = Image.effect_mandelbrot((64, 48), (-2, -1.2, 1, 1.2), 60).convert("RGB")
    data = [jpeg_bytes(photo), jpeg_bytes(photo.rotate(90, expand=True)), jpeg_bytes(photo.convert("L"))]
    seed_everything(4)
    items = [MAEEncodedTransform(size, (0.3, 1.0), 4)(EncodedImage.of({"jpg": one})) for one in data]
    for label, item in enumerate(items):
        item["label"] = torch.tensor(label)
    return data, collate_encoded(items)


def test_a_jpeg_the_device_cannot_decode_is_decoded_by_pillow(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    data, batch = three_rows()
    expected = DeviceViews(32)({k: v.clone() for k, v in batch.items()}, CPU)
    failing_decoder(monkeypatch, data[1])
    stage = DeviceViews(32)
    out = stage(batch, CPU)
    assert out["valid"].tolist() == [True, True, True] and covered_rows(stage) == 0
    assert (out["image"] - expected["image"]).abs().mean() < 0.01  # Pillow's pixels: libjpeg's, as the device's
    assert "row 1) did not decode on cpu (nvjpeg: status 6); decoded by Pillow instead" in capsys.readouterr().err


def test_a_row_that_decodes_nowhere_is_replaced_by_another_row_never_black(monkeypatch: pytest.MonkeyPatch,
                                                                           capsys: pytest.CaptureFixture) -> None:
    data, batch = three_rows()
    failing_decoder(monkeypatch, data[1])
    monkeypatch.setattr(gpu_decode, "host_decode", lambda _: "does not decode: broken")
    stage = DeviceViews(32)
    out = stage(batch, CPU)
    assert out["valid"].tolist() == [True, False, True] and covered_rows(stage) == 1
    for key in ("image", "mask_noise", "label"):  # row 0's sample, its crop and its mask stand in for row 1
        assert torch.equal(out[key][1], out[key][0]), key
    assert not torch.equal(out["image"][2], out["image"][0]) and out["image"][1].std() > 0.1
    assert "row 1) passed the worker's check but decodes neither" in capsys.readouterr().err
    failing_decoder(monkeypatch, data[0])
    with pytest.raises(DataError, match="none of the 1 JPEGs of a batch decodes"):
        stage(collate_encoded([MAEEncodedTransform(32, (0.3, 1.0), 4)(EncodedImage.of({"jpg": data[0]}))]), CPU)
    assert covered_rows(stage) == 2 and covered_rows(None) == 0


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
