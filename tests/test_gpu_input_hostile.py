"""Hostile JPEGs through both input paths (data.decode=cpu and data.decode=gpu, the device stage on the CPU): a
scan garbled behind a valid header, headers lying about their size (13000 x 13000, between 1x and 2x Pillow's
MAX_IMAGE_PIXELS, and 14000 x 14000, above 2x), a truncated JPEG and payloads that are no JPEG, among real images.
Both paths must skip and count the same samples, train on the same ones with full batches, allocate nothing from a
lying header and never train on a black image."""

from __future__ import annotations

import io
import itertools
import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, MINI_IMAGES, read_metrics, run_largessl
from PIL import Image
from test_train import ok
from torchvision.io import ImageReadMode, decode_jpeg

from data_tools.shards import SplitWriter, write_index
from largessl.data import gpu_decode, jpeg_check
from largessl.data.gpu_decode import DeviceViews, MAEEncodedTransform
from largessl.data.index import open_split
from largessl.data.jpeg_check import checked_jpeg, host_decode
from largessl.data.loader import CorruptLog, TrainStream
from largessl.data.stream import StreamPlan
from largessl.data.transforms import MAETransform

SIZE, PATCHES, BATCH = 32, 4, 8
CPU = torch.device("cpu")
REAL = sorted((MINI_IMAGES / "train").rglob("*.JPEG"))


def jpeg_of(image: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=options.pop("format", "JPEG"), **options)
    return out.getvalue()


def scan_start(data: bytes) -> int:
    """Where the first scan's entropy-coded data begins (after its SOS header)."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2: sos + 4], "big")


def garbled_scan(data: bytes, seed: int = 3) -> bytes:
    """The header as it was, the entropy-coded data replaced by random bytes of the same length, the end marker."""
    start, rng = scan_start(data), random.Random(seed)
    return data[:start] + bytes(rng.randrange(256) for _ in range(len(data) - start - 2)) + b"\xff\xd9"


def lying(width: int, height: int) -> bytes:
    """A tiny real JPEG (8 x 8) whose frame header claims width x height."""
    data = jpeg_of(Image.new("RGB", (8, 8), (200, 30, 90)))
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[sof + 9:]


def hostile_samples() -> dict[str, bytes]:
    real = REAL[0].read_bytes()
    photo = Image.open(io.BytesIO(real)).convert("RGB")
    return {
        "bad-garbled": garbled_scan(real),
        "bad-lying13000": lying(13000, 13000),
        "bad-lying14000": lying(14000, 14000),
        "bad-truncated": real[: len(real) // 2],
        "bad-png": jpeg_of(photo, format="PNG"),
        "bad-text": b"not an image at all",
        "bad-cmyk": jpeg_of(photo.convert("CMYK")),
    }


def write_hostile(out: Path, good: int = 33) -> Path:
    """One train shard: `good` real JPEGs (one re-encoded as greyscale, one progressive) with the hostile samples
    spread among them; a val split of real JPEGs."""
    out.mkdir(parents=True)
    bad = list(hostile_samples().items())
    for split, count in (("train", good), ("val", 16)):
        writer = SplitWriter(out, split, samples_per_shard=10**9, shard_bytes=1 << 40)
        for position, path in enumerate(REAL[:count]):
            data = path.read_bytes()
            if position in (1, 2):
                image = Image.open(path).convert("L" if position == 1 else "RGB")
                data = jpeg_of(image, progressive=position == 2)
            writer.write(f"s{position:03d}", data, CLASSES.index(path.parent.name), {"source": path.name})
            if split == "train" and position % 4 == 3 and bad:
                key, payload = bad.pop(0)
                writer.write(key, payload, 0, {"source": key})
        write_index(out, name="hostile", source="test", classes=CLASSES, split=split, split_entry=writer.finish(),
                    preprocess={})
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hostile(tmp_path_factory.mktemp("hostile") / "shards")


def test_the_samples_are_what_they_claim_to_be() -> None:
    """The hostile samples hit the failures of the report: the garbled scan fails torchvision's decoder (the old
    GPU path's black image) and Pillow's; the lying headers sit in and above Pillow's warning band."""
    samples = hostile_samples()
    with pytest.raises(RuntimeError):
        decode_jpeg(torch.frombuffer(bytearray(samples["bad-garbled"]), dtype=torch.uint8), mode=ImageReadMode.RGB)
    assert isinstance(host_decode(samples["bad-garbled"]), str)
    assert Image.open(io.BytesIO(REAL[0].read_bytes())).size == (112, 112)  # the garbled one's header: valid
    assert len(samples["bad-lying13000"]) < 700
    limit = Image.MAX_IMAGE_PIXELS
    assert limit < 13000 * 13000 <= 2 * limit < 14000 * 14000
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow alone only warns, and would go on to decode
        Image.open(io.BytesIO(samples["bad-lying13000"])).close()


REASONS = {
    "bad-garbled": "corrupt", "bad-lying13000": "too many pixels: the header claims 13000 x 13000",
    "bad-lying14000": "too many pixels: the header claims 14000 x 14000", "bad-truncated": "truncated",
    "bad-png": "not a JPEG", "bad-text": "not a JPEG", "bad-cmyk": "unsupported JPEG: 4 colour components",
}


def test_the_check_refuses_each_with_its_reason_and_lying_headers_before_pillow(monkeypatch: pytest.MonkeyPatch
                                                                                ) -> None:
    samples = hostile_samples()
    for key, data in samples.items():
        assert checked_jpeg({"jpg": data}).startswith(REASONS[key]), key

    def no_open(*_: object, **__: object) -> None:
        raise AssertionError("Image.open reached")

    monkeypatch.setattr(jpeg_check.Image, "open", no_open)
    for key in ("bad-lying13000", "bad-lying14000"):  # refused from the frame header: nothing opened or decoded
        assert checked_jpeg({"jpg": samples[key]}).startswith("too many pixels"), key


def test_a_lowered_limit_is_the_one_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    good = {"jpg": REAL[0].read_bytes()}  # 112 x 112 = 12,544 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12_544)
    assert checked_jpeg(good)[1] == (112, 112)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12_543)
    assert checked_jpeg(good).startswith("too many pixels")


def make_stream(root: Path, encoded: bool, log: Path) -> tuple[TrainStream, list[str]]:
    """A one-reader stream of one path, and the list its decodable samples' keys are appended to when read."""
    plan = StreamPlan(shards=open_split(str(root), "train").shards, seed=5, num_slots=1, batch_size=BATCH,
                      shuffle_buffer=12)
    transform = MAEEncodedTransform(SIZE, (0.2, 1.0), PATCHES) if encoded else MAETransform(SIZE, (0.2, 1.0), PATCHES)
    stream = TrainStream(plan, transform, rank=0, world_size=1, num_workers=0, corrupt_log=CorruptLog(str(log), 0),
                         encoded=encoded)
    trained, decode = [], stream.decode

    def recording(sample: dict) -> object:
        image = decode(sample)
        if not isinstance(image, str):
            trained.append(sample["__key__"])
        return image

    stream.decode = recording
    return stream, trained


class Calls:
    """Records the bytes every JPEG opener and decoder is handed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[bytes] = []
        opener, decoder = Image.open, gpu_decode.decode_jpeg

        def opened(source: io.BytesIO, *args: object, **kwargs: object) -> Image.Image:
            self.seen.append(source.getvalue())
            return opener(source, *args, **kwargs)

        def decoded(data: object, *args: object, **kwargs: object) -> object:
            rows = data if isinstance(data, list) else [data]
            self.seen.extend(bytes(row.numpy()) for row in rows)
            return decoder(data, *args, **kwargs)

        monkeypatch.setattr(jpeg_check.Image, "open", opened)
        monkeypatch.setattr(gpu_decode, "decode_jpeg", decoded)


def run_path(root: Path, encoded: bool, log: Path, batches: int) -> tuple[list[dict], list[str]]:
    """`batches` training batches of one path (the GPU path's through its device stage), and the keys read."""
    stream, trained = make_stream(root, encoded, log)
    out = []
    for batch in itertools.islice(iter(stream), batches):
        out.append({key: value for key, value in batch.items() if key.startswith("_")})
        rest = {key: value for key, value in batch.items() if not key.startswith("_")}
        out[-1].update(DeviceViews(SIZE)(rest, CPU) if encoded else rest)
    return out, trained


def test_both_paths_skip_count_and_train_on_the_same_samples(hostile: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    batches = 10  # two epochs of 5 batches: 33 good + 7 bad samples, the spares read past the range
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow never even sees a lying header
        cpu, cpu_keys = run_path(hostile, False, tmp_path / "cpu.jsonl", batches)
        gpu, gpu_keys = run_path(hostile, True, tmp_path / "gpu.jsonl", batches)
    assert cpu_keys == gpu_keys and len(cpu_keys) == batches * BATCH  # the same samples in the same order ...
    assert not any(key.startswith("bad") for key in gpu_keys)
    for c, g in zip(cpu, gpu, strict=True):
        assert g["image"].shape == c["image"].shape == (BATCH, 3, SIZE, SIZE)  # ... in full batches
        assert torch.equal(c["mask_noise"], g["mask_noise"]) and torch.equal(c["label"], g["label"])  # same draws
        assert int(c["_corrupt"]) == int(g["_corrupt"]) and int(c["_raw_pos"]) == int(g["_raw_pos"])
        assert bool(g["valid"].all())
        assert (g["image"].flatten(1).std(1) > 0.1).all()  # no black (or any flat) image among them
    entries = [json.loads(line) for line in (tmp_path / "cpu.jsonl").read_text().splitlines()]
    assert entries == [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    assert {e["key"] for e in entries if e["epoch"] == 0} == set(REASONS)  # every hostile sample, and only they
    assert int(gpu[-1]["_corrupt"]) == len(entries) >= 2 * len(REASONS)
    lying = {hostile_samples()[key] for key in ("bad-lying13000", "bad-lying14000")}
    assert calls.seen and not lying & set(calls.seen)  # no opener or decoder was ever handed a lying header


def test_what_the_check_passes_both_decoders_decode() -> None:
    """Random damage to real JPEGs (baseline, progressive, with restart markers, greyscale): the check never
    raises, and whatever it passes decodes with Pillow (the CPU path) and torchvision (the device stage)."""
    rng, passed, refused = random.Random(11), 0, 0
    photos = [Image.open(path).convert("RGB") for path in REAL[:3]]
    bases = [jpeg_of(photo, **options) for photo in photos for options in (
        {}, {"progressive": True}, {"restart_marker_blocks": 2}, {"quality": 95, "subsampling": 0})]
    bases += [jpeg_of(photos[0].convert("L"), progressive=True)]
    for _ in range(400):
        data = bytearray(rng.choice(bases))
        at = rng.randrange(len(data))
        if rng.random() < 0.5:
            data[at: at + rng.randint(1, 3)] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 3)))
        else:
            data = data[:at] + data[at + rng.randint(1, 40):]
        verdict = checked_jpeg({"jpg": bytes(data)})
        if isinstance(verdict, str):
            refused += 1
            continue
        passed += 1
        assert not isinstance(host_decode(bytes(data)), str)
        decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    assert passed > 50 and refused > 50, (passed, refused)


def test_the_report_command_on_the_gpu_path_matches_the_cpu_path(hostile: Path, tmp_path: Path) -> None:
    """The reported reproduction, both ways: the same corrupt count at each report, the same corrupt_samples.jsonl
    entries for the epochs both runs consumed, the same losses, and no black image."""
    base = ["pretrain", "--config", "debug/mae_vit_tiny", f"data.train={hostile}", f"data.val={hostile}",
            "data.micro_batch_size=8", "optim.global_batch_size=8", "trainer.max_steps=14", "trainer.log_every=7",
            "tracking.enabled=false", "eval.knn_every=0"]
    runs = {}
    for decode in ("cpu", "gpu"):
        result = ok(run_largessl([*base, f"data.decode={decode}", f"run.name={decode}"], tmp_path))
        assert "black" not in result.stderr and "did not decode" not in result.stderr
        run = tmp_path / "runs" / decode
        entries = [json.loads(line) for line in (run / "corrupt_samples.jsonl").read_text().splitlines()]
        runs[decode] = read_metrics(run), [e for e in entries if e["epoch"] < 2]  # 14 of 5 batches: epochs 0, 1
    (cpu, cpu_entries), (gpu, gpu_entries) = runs["cpu"], runs["gpu"]
    assert {e["key"] for e in gpu_entries} == set(REASONS) and gpu_entries == cpu_entries
    for step in (7, 14):
        assert gpu[step]["data/corrupt_images"] == cpu[step]["data/corrupt_images"] >= len(REASONS)
        assert gpu[step]["loss"] == pytest.approx(cpu[step]["loss"], rel=2e-2)
    assert gpu[14]["data/corrupt_images"] > gpu[7]["data/corrupt_images"]
