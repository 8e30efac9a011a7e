"""data_tools on real images: Imagenette end to end, an ImageNet-22K-style release tar with the bad inputs real
dumps contain, kill-and-resume byte equality, determinism, and verify catching damage."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from data_tools.__main__ import main as data_tools
from tests.conftest import CLASSES, MINI_IMAGES, REPO

EXIF_ORIENTATION = 0x0112


# --- helpers -------------------------------------------------------------------------------------------------

def read_samples(out: Path) -> dict[str, dict]:
    """source -> {"key", "jpg", "cls", "meta", "split"} for every sample of every split in dataset.json."""
    index = json.loads((out / "dataset.json").read_text())
    samples = {}
    for split, entry in index["splits"].items():
        for shard in entry["shards"]:
            with tarfile.open(out / shard["file"]) as tar:
                members: dict[str, dict[str, bytes]] = {}
                for info in tar:
                    key, _, ext = info.name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(info).read()
            for key, m in members.items():
                meta = json.loads(m["json"])
                assert meta["source"] not in samples, f"{meta['source']} stored twice"
                samples[meta["source"]] = {"key": key, "jpg": m["jpg"], "cls": int(m["cls"]), "meta": meta,
                                           "split": split}
    return samples


def rejects_of(out: Path) -> dict[str, str]:
    """source -> reason, from rejected.jsonl."""
    lines = (out / "rejected.jsonl").read_text().splitlines()
    return {json.loads(line)["source"]: json.loads(line)["reason"] for line in lines}


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def mini_files(wnid: str, count: int) -> list[Path]:
    return sorted((MINI_IMAGES / "train" / wnid).glob("*.JPEG"))[:count]


def base_image() -> Image.Image:
    """A real photo, cropped non-square so a rotation shows in its size."""
    with Image.open(mini_files(CLASSES[0], 1)[0]) as image:
        return image.convert("RGB").crop((0, 0, 112, 80))


def bad_inputs() -> dict[str, tuple[bytes, str]]:
    """file name -> (bytes, expected outcome: 'convert' or the reject reason)."""
    photo = base_image()
    alpha = photo.convert("RGBA")
    alpha.putalpha(Image.new("L", photo.size, 0).crop((0, 0, 56, 80)).resize(photo.size))  # fully transparent
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored sideways: rotate 90 degrees to view
    real = mini_files(CLASSES[0], 1)[0].read_bytes()
    return {
        "png_named.JPEG": (encoded(photo, "PNG"), "convert"),
        "gif_named.JPEG": (encoded(palette, "GIF"), "convert"),
        "webp_named.JPEG": (encoded(photo, "WEBP"), "convert"),
        "cmyk.JPEG": (jpeg_bytes(photo.convert("CMYK")), "convert"),
        "grey.JPEG": (jpeg_bytes(photo.convert("L")), "convert"),
        "palette_alpha.png": (encoded(palette, "PNG", transparency=0), "convert"),
        "alpha.png": (encoded(alpha, "PNG"), "convert"),
        "rotated.JPEG": (jpeg_bytes(photo, exif=exif), "convert"),
        "truncated.JPEG": (real[: len(real) // 2], "corrupt image"),
        "empty.JPEG": (b"", "empty file"),
        "notes.JPEG": (b"not an image, just text\n" * 20, "not an image"),
    }


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def synset_tar(members: dict[str, bytes], compress: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            add_member(tar, name, data)
    return gzip.compress(buffer.getvalue(), mtime=0) if compress else buffer.getvalue()


def release_members(per_class: int) -> dict[str, bytes]:
    """Per-synset tars in the official release layout, from the bundled Imagenette images, with bad inputs."""
    photo = base_image()
    real = mini_files(CLASSES[0], 1)[0].read_bytes()
    tars = {}
    for i, wnid in enumerate(CLASSES):
        members = {f"{wnid}_{n}.JPEG": path.read_bytes() for n, path in enumerate(mini_files(wnid, per_class))}
        if i == 0:
            members[f"{wnid}_corrupt.JPEG"] = real[: len(real) // 3]
            members["../escape.JPEG"] = real
            members["/abs.JPEG"] = real
        if i == 1:
            members[f"{wnid}_png.JPEG"] = encoded(photo, "PNG")
        if i == 3:
            members[f"{wnid}_cmyk.JPEG"] = jpeg_bytes(photo.convert("CMYK"))
        tars[f"{wnid}.tar"] = synset_tar(members, compress=i == 2)  # the release gzips some inner tars
    tars["n09999999.tar"] = b"this is not a tar file" * 100
    return tars


def write_release_tar(path: Path, per_class: int = 12) -> Path:
    with tarfile.open(path, mode="w") as outer:
        for name, data in release_members(per_class).items():
            add_member(outer, name, data)
        add_member(outer, "README.txt", b"ImageNet fall 2011 release\n")
        link = tarfile.TarInfo(f"{CLASSES[4]}_link.tar")
        link.type, link.linkname = tarfile.SYMTYPE, f"{CLASSES[4]}.tar"
        outer.addfile(link)
    return path


def convert(*args: str | Path) -> int:
    return data_tools([str(a) for a in args])


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def without_created(out: Path) -> dict:
    index = json.loads((out / "dataset.json").read_text())
    index.pop("created")
    return index


# --- Imagenette end to end -----------------------------------------------------------------------------------

def test_imagenette_end_to_end(imagenette_shards: Path, imagenette_dir: Path) -> None:
    index = json.loads((imagenette_shards / "dataset.json").read_text())
    assert index["classes"] == sorted(p.name for p in (imagenette_dir / "train").iterdir())
    assert index["splits"]["train"]["num_samples"] == 9469 and index["splits"]["val"]["num_samples"] == 3925
    assert convert("verify", imagenette_shards, "--workers", "2") == 0
    samples = read_samples(imagenette_shards)
    assert len(samples) == 9469 + 3925
    for source, sample in samples.items():
        wnid = source.split("/")[0]  # the class folder the image came from
        assert index["classes"][sample["cls"]] == wnid == sample["meta"]["wnid"], source
    converted = 0
    for source, sample in samples.items():
        original = (imagenette_dir / sample["split"] / source).read_bytes()
        with Image.open(io.BytesIO(original)) as image:
            if image.mode == "RGB":  # RGB JPEGs are stored byte for byte
                assert sample["jpg"] == original, source
                continue
        converted += 1  # Imagenette's greyscale JPEGs become RGB JPEGs of the same size
        with Image.open(io.BytesIO(sample["jpg"])) as stored, Image.open(io.BytesIO(original)) as image:
            assert (stored.format, stored.mode, stored.size) == ("JPEG", "RGB", image.size), source
    assert converted == 242
    counts = [s["num_samples"] for s in index["splits"]["train"]["shards"]]
    assert counts == [1000] * 9 + [469]  # --samples-per-shard 1000: exactly 1,000 a shard, the rest in the last


def test_every_shard_mixes_all_classes(mini_shards: Path) -> None:
    index = json.loads((mini_shards / "dataset.json").read_text())
    for shard in index["splits"]["train"]["shards"]:
        with tarfile.open(mini_shards / shard["file"]) as tar:
            labels = {int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")}
        assert labels == set(range(10)), shard["file"]


# --- bad input -----------------------------------------------------------------------------------------------

def test_imagefolder_converts_or_rejects_each_bad_input(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for wnid in CLASSES[:2]:
        (src / wnid).mkdir(parents=True)
        for path in mini_files(wnid, 20):
            shutil.copy(path, src / wnid / path.name)
    cases = bad_inputs()
    for name, (data, _) in cases.items():
        (src / CLASSES[1] / name).write_bytes(data)
    (src / "stray.JPEG").write_bytes(mini_files(CLASSES[0], 1)[0].read_bytes())  # in no class folder
    out = tmp_path / "out"
    assert convert("imagefolder", src, out, "--workers", "2", "--max-reject-fraction", "0.2") == 0

    samples, rejects = read_samples(out), rejects_of(out)
    expected_rejects = {f"{CLASSES[1]}/{n}": why for n, (_, why) in cases.items() if why != "convert"}
    assert rejects == {**expected_rejects, "stray.JPEG": "not in a class folder"}
    assert len(samples) == 40 + sum(why == "convert" for _, why in cases.values())
    for name, (_, why) in cases.items():
        if why != "convert":
            continue
        sample = samples[f"{CLASSES[1]}/{name}"]
        assert sample["cls"] == 1
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            assert (image.format, image.mode) == ("JPEG", "RGB"), name
            assert image.size == (sample["meta"]["width"], sample["meta"]["height"])
            assert image.size == ((80, 112) if name == "rotated.JPEG" else (112, 80)), name
            if name == "alpha.png":  # the transparent left half is white, not black
                assert min(image.getpixel((10, 40))) > 235
    for path in mini_files(CLASSES[0], 20):  # RGB JPEGs are stored byte for byte
        assert samples[f"{CLASSES[0]}/{path.name}"]["jpg"] == path.read_bytes()
    assert convert("verify", out, "--workers", "2") == 0


def test_reject_fraction_sets_the_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "src" / CLASSES[0]
    src.mkdir(parents=True)
    for path in mini_files(CLASSES[0], 30):
        shutil.copy(path, src / path.name)
    (src / "empty.JPEG").write_bytes(b"")  # 1 of 31 inputs: 3.2 %
    assert convert("imagefolder", src.parent, tmp_path / "a", "--workers", "1") == 1
    assert "more than --max-reject-fraction 0.01" in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "dataset.json").read_text())["splits"]["train"]["num_samples"] == 30
    assert convert("imagefolder", src.parent, tmp_path / "b", "--workers", "1", "--max-reject-fraction", "0.05") == 0


def test_max_size_shrinks_never_enlarges(tmp_path: Path) -> None:
    src = tmp_path / "src" / CLASSES[0]
    src.mkdir(parents=True)
    big = base_image().resize((600, 400))
    (src / "big.JPEG").write_bytes(jpeg_bytes(big))
    small = mini_files(CLASSES[0], 1)[0]
    shutil.copy(small, src / small.name)
    out = tmp_path / "out"
    assert convert("imagefolder", src.parent, out, "--max-size", "150", "--workers", "1") == 0
    samples = read_samples(out)
    with Image.open(io.BytesIO(samples[f"{CLASSES[0]}/big.JPEG"]["jpg"])) as image:
        assert image.size == (225, 150)
    assert samples[f"{CLASSES[0]}/{small.name}"]["jpg"] == small.read_bytes()  # 112 px short side: copied
    assert json.loads((out / "dataset.json").read_text())["preprocess"]["max_size"] == 150


# --- ImageNet-22K layouts ------------------------------------------------------------------------------------

def test_imagenet22k_release_tar_with_bad_members(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    release = write_release_tar(tmp_path / "fall11_whole.tar")
    out = tmp_path / "work" / "in22k"
    assert convert("imagenet22k", release, out, "--workers", "2", "--samples-per-shard", "25") == 1  # 6 rejects: 4.7 %
    assert "rejected" in capsys.readouterr().err
    index = json.loads((out / "dataset.json").read_text())
    assert index["classes"] == sorted([*CLASSES, "n09999999"])  # an unreadable tar keeps its class index
    assert rejects_of(out) == {
        f"{CLASSES[0]}.tar/{CLASSES[0]}_corrupt.JPEG": "corrupt image",
        f"{CLASSES[0]}.tar/../escape.JPEG": "unsafe member name",
        f"{CLASSES[0]}.tar//abs.JPEG": "unsafe member name",
        "n09999999.tar": "unreadable tar",
        "README.txt": "not a synset tar",
        f"{CLASSES[4]}_link.tar": "not a regular file",
    }
    samples = read_samples(out)
    assert len(samples) == index["splits"]["train"]["num_samples"] == 10 * 12 + 2
    for source, sample in samples.items():
        assert index["classes"][sample["cls"]] == source.split(".tar/")[0] == sample["meta"]["wnid"]
    for name in (f"{CLASSES[1]}.tar/{CLASSES[1]}_png.JPEG", f"{CLASSES[3]}.tar/{CLASSES[3]}_cmyk.JPEG"):
        with Image.open(io.BytesIO(samples[name]["jpg"])) as image:
            assert (image.format, image.mode) == ("JPEG", "RGB")
    gzipped = [s for src, s in samples.items() if src.startswith(f"{CLASSES[2]}.tar/")]
    assert len(gzipped) == 12  # the gzip-compressed inner tar is read
    everything = [p.name for p in tmp_path.rglob("*")]
    assert "escape.JPEG" not in everything and "abs.JPEG" not in everything  # nothing written outside OUT
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "rejected.jsonl"] + [
        f"train-{i:06d}.tar" for i in range(5)]  # work directory and unpacked gzip tar removed
    assert convert("verify", out, "--workers", "2") == 0


def test_imagenet22k_layouts_give_the_same_shards(tmp_path: Path) -> None:
    release = write_release_tar(tmp_path / "release.tar", per_class=6)
    per_synset = tmp_path / "synset_tars"
    per_synset.mkdir()
    for name, data in release_members(per_class=6).items():
        (per_synset / name).write_bytes(data)
    options = ["--workers", "2", "--samples-per-shard", "20", "--max-reject-fraction", "1"]
    assert convert("imagenet22k", release, tmp_path / "a" / "ds", *options) == 0
    assert convert("imagenet22k", per_synset, tmp_path / "b" / "ds", *options) == 0
    a, b = files_of(tmp_path / "a" / "ds"), files_of(tmp_path / "b" / "ds")
    assert {k: v for k, v in a.items() if k.endswith(".tar")} == {k: v for k, v in b.items() if k.endswith(".tar")}

    folders = tmp_path / "synset_folders"  # the third layout: one folder per synset
    for wnid in CLASSES:
        (folders / wnid).mkdir(parents=True)
        for path in mini_files(wnid, 6):
            shutil.copy(path, folders / wnid / path.name)
    assert convert("imagenet22k", folders, tmp_path / "c", *options) == 0
    assert len(read_samples(tmp_path / "c")) == 60


def test_val_holdout_and_class_list(tmp_path: Path) -> None:
    release = write_release_tar(tmp_path / "release.tar", per_class=12)
    listed = [CLASSES[5], CLASSES[6], CLASSES[3]]  # a subset, in the file's order
    (tmp_path / "classes.txt").write_text("\n".join(listed) + "\n")
    options = ["--workers", "2", "--max-reject-fraction", "1", "--val-per-class", "4", "--classes",
               tmp_path / "classes.txt"]
    assert convert("imagenet22k", release, tmp_path / "a", *options) == 0
    assert convert("imagenet22k", release, tmp_path / "b", *options, "--workers", "1") == 0
    index = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert index["classes"] == listed
    samples = read_samples(tmp_path / "a")
    val = [s for s in samples.values() if s["split"] == "val"]
    assert sorted(s["cls"] for s in val) == [0] * 4 + [1] * 4 + [2] * 4
    assert index["splits"]["train"]["num_samples"] == 3 * 12 + 1 - 12  # CMYK extra in class 3; 4 x 3 held out
    assert len(samples) == 3 * 12 + 1  # val and train are disjoint: every source once (read_samples asserts)
    assert rejects_of(tmp_path / "a")[f"{CLASSES[1]}.tar"] == "class not in --classes"
    assert files_of(tmp_path / "b") != {}
    assert {k: v for k, v in files_of(tmp_path / "a").items() if k != "dataset.json"} == {
        k: v for k, v in files_of(tmp_path / "b").items() if k != "dataset.json"}


# --- resume and determinism ----------------------------------------------------------------------------------

def test_same_output_for_any_worker_count(tmp_path: Path) -> None:
    for name, workers in (("one", "1"), ("two", "2")):
        assert convert("imagefolder", MINI_IMAGES / "train", tmp_path / name / "ds", "--workers", workers,
                       "--samples-per-shard", "64", "--max-size", "64", "--seed", "7") == 0
    one, two = files_of(tmp_path / "one" / "ds"), files_of(tmp_path / "two" / "ds")
    assert one.keys() == two.keys() and len(one) == 2 + 8
    assert {k: v for k, v in one.items() if k != "dataset.json"} == {k: v for k, v in two.items()
                                                                     if k != "dataset.json"}
    assert without_created(tmp_path / "one" / "ds") == without_created(tmp_path / "two" / "ds")
    other_seed = tmp_path / "seed8"
    assert convert("imagefolder", MINI_IMAGES / "train", other_seed, "--samples-per-shard", "64", "--seed", "8") == 0
    assert (other_seed / "train-000000.tar").read_bytes() != one["train-000000.tar"]


def converter(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "data_tools", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_after(args: list[str], done_dir: Path, shards_done: int) -> None:
    """Start a conversion and SIGKILL its whole process group once `shards_done` shards are recorded."""
    process = converter(args)
    deadline = time.monotonic() + 120
    while not (done_dir.is_dir() and len(list(done_dir.glob("*.json"))) >= shards_done):
        assert process.poll() is None, f"finished before it could be killed:\n{process.stdout.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_kill_and_resume_is_byte_identical(imagenette_dir: Path, tmp_path: Path) -> None:
    src = imagenette_dir / "val"
    options = ["--samples-per-shard", "100", "--max-size", "96", "--workers", "2"]
    resumed = tmp_path / "resumed" / "ds"
    args = ["imagefolder", str(src), str(resumed), "--split", "val", *options]
    kill_after(args, resumed / ".convert" / "val" / "done", 3)
    assert not (resumed / "dataset.json").exists()
    kill_after(args, resumed / ".convert" / "val" / "done", 15)  # killed again, later
    finished = converter(args)
    output = finished.communicate(timeout=300)[0]
    assert finished.returncode == 0, output
    assert "resuming" in output
    reference = tmp_path / "reference" / "ds"
    assert convert("imagefolder", src, reference, "--split", "val", *options) == 0
    a, b = files_of(resumed), files_of(reference)
    assert a.keys() == b.keys() and len(a) == 40 + 2  # 3,925 samples in 40 shards, no leftovers
    assert {k: v for k, v in a.items() if k != "dataset.json"} == {k: v for k, v in b.items() if k != "dataset.json"}
    assert without_created(resumed) == without_created(reference)
    assert json.loads(a["dataset.json"])["splits"]["val"]["num_samples"] == 3925


def test_rerun_after_completion_and_changed_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ds"
    args = ["imagefolder", MINI_IMAGES / "val", out, "--split", "val", "--workers", "1"]
    assert convert(*args) == 0
    before = files_of(out)
    assert convert(*args) == 0
    assert "nothing to do" in capsys.readouterr().err and files_of(out) == before
    assert convert(*args, "--seed", "3") == 2
    assert "written with other options" in capsys.readouterr().err
    (out / ".convert" / "train").mkdir(parents=True)  # an unfinished conversion with other options
    (out / ".convert" / "train" / "plan.json").write_text(json.dumps({"record": {
        "command": "imagefolder", "src": "/elsewhere", "splits": ["train"], "options": {"seed": 1}}}))
    assert convert("imagefolder", MINI_IMAGES / "train", out, "--workers", "1") == 2
    err = capsys.readouterr().err
    assert "unfinished conversion started with other options" in err and "seed" in err


# --- verify --------------------------------------------------------------------------------------------------

@pytest.fixture()
def small_dataset(tmp_path: Path) -> Path:
    out = tmp_path / "ds"
    assert convert("imagefolder", MINI_IMAGES / "val", out, "--split", "val", "--samples-per-shard", "50",
                   "--workers", "2") == 0
    return out


def test_verify_catches_a_flipped_byte(small_dataset: Path, capsys: pytest.CaptureFixture) -> None:
    shard = small_dataset / "val-000001.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert convert("verify", small_dataset, "--quick") == 0  # same size and count: quick cannot see it
    assert convert("verify", small_dataset) == 1
    output = capsys.readouterr().out
    assert "val-000001.tar: sha256 differs" in output and "FAILED" in output


def test_verify_catches_a_missing_shard(small_dataset: Path, capsys: pytest.CaptureFixture) -> None:
    (small_dataset / "val-000002.tar").unlink()
    assert convert("verify", small_dataset, "--quick") == 1
    assert "val-000002.tar: missing" in capsys.readouterr().out


def test_verify_catches_a_wrong_count(small_dataset: Path, capsys: pytest.CaptureFixture) -> None:
    index = json.loads((small_dataset / "dataset.json").read_text())
    index["splits"]["val"]["shards"][0]["num_samples"] += 1
    (small_dataset / "dataset.json").write_text(json.dumps(index))
    assert convert("verify", small_dataset) == 1
    output = capsys.readouterr().out
    assert "val-000000.tar: 50 samples, dataset.json says 51" in output
    assert "num_samples 200 but its shards add up to 201" in output


def test_verify_catches_an_undecodable_image_and_bad_label(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from data_tools.shards import SplitWriter, write_index

    out = tmp_path / "ds"
    out.mkdir()
    writer = SplitWriter(out, "train", samples_per_shard=100, shard_bytes=1 << 30)
    real = mini_files(CLASSES[0], 1)[0].read_bytes()
    writer.write("good", real, 0, {"source": "good"})
    writer.write("broken", real[:500], 1, {"source": "broken"})
    writer.write("badlabel", real, 10, {"source": "badlabel"})
    write_index(out, name="t", source="t", classes=CLASSES, split="train", split_entry=writer.finish(),
                preprocess={})
    assert convert("verify", out) == 1
    output = capsys.readouterr().out
    assert "sample broken does not decode" in output and "sample badlabel has label b'10', not in 0..9" in output


# --- inspect and command-line errors -------------------------------------------------------------------------

def test_inspect_prints_histogram_and_writes_contact_sheet(mini_shards: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    sheet = tmp_path / "sheet.png"
    assert convert("inspect", mini_shards, "--sheet", sheet, "--samples", "16", "--workers", "2") == 0
    output = capsys.readouterr().out
    assert "[train] 500 samples in 4 shards" in output and "[val] 200 samples in 2 shards" in output
    assert f"0 {CLASSES[0]}" in output and output.count(" 50 ####") == 10 and output.count(" 20 ####") == 10
    with Image.open(sheet) as image:
        assert image.format == "PNG" and image.size == (8 * 160, 2 * (160 + 14))


@pytest.mark.parametrize(("args", "message"), [
    (["imagefolder", "/nonexistent/src", "OUT"], "SRC '/nonexistent/src' does not exist"),
    (["imagenet22k", "SRC_FILE", "OUT"], "cannot read"),
    (["verify", "OUT"], "has no dataset.json"),
    (["imagefolder", "EMPTY", "OUT"], "no images under class folders"),
    (["imagefolder", "EMPTY", "OUT", "--split", "../up"], "--split must be letters, digits or _"),
    (["verify", "MALFORMED"], "dataset.json is malformed: no splits.train.num_samples"),
])
def test_bad_input_one_line_error(args: list[str], message: str, tmp_path: Path) -> None:
    (tmp_path / "SRC_FILE").write_bytes(b"not a tar at all" * 64)
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "MALFORMED").mkdir()
    (tmp_path / "MALFORMED" / "dataset.json").write_text(json.dumps(
        {"format": "largessl-wds/1", "classes": [], "splits": {"train": {"shards": []}}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "data_tools", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "OUT").exists() or not any((tmp_path / "OUT").iterdir())  # a failed start leaves nothing


def test_refuses_shards_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"someone else's shard")
    assert convert("imagefolder", MINI_IMAGES / "train", out) == 2
    assert "not written by this conversion" in capsys.readouterr().err
    assert (out / "train-000000.tar").read_bytes() == b"someone else's shard"
