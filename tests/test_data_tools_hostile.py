"""data_tools against hostile and damaged input ("fail loud, lose nothing"): paths that leave their directory,
symlinks, gzip bombs, foreign output directories, truncated tars, a wrong number of classes, hand-edited
dataset.json files, bad shard members and labels, and images with too many pixels. Real images, real tars, real
gzip; every bad input must end in one line (or a FAILED report) and a non-zero exit, never a traceback."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_tools.shards import write_index
from tests.conftest import CLASSES, REPO, uneven_dataset
from tests.test_data_tools import add_member, convert, mini_files, read_samples, rejects_of, synset_tar

# --- helpers -------------------------------------------------------------------------------------------------


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    """The single `python -m data_tools: error: ...` line a failed command printed on stderr, last (after any
    progress lines)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert errors[0].startswith("python -m data_tools: error: "), err
    return errors[0]


def image_tree(root: Path, classes: list[str], per_class: int) -> Path:
    """SRC/CLASS/IMAGE with real bundled JPEGs."""
    for wnid in classes:
        (root / wnid).mkdir(parents=True)
        for path in mini_files(wnid, per_class):
            shutil.copy(path, root / wnid / path.name)
    return root


def raw_shard(path: Path, members: list[tuple[str, bytes | tarfile.TarInfo]]) -> dict:
    """A tar written member by member (TarInfo for links and folders); its dataset.json entry."""
    samples = set()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            if isinstance(data, tarfile.TarInfo):
                tar.addfile(data)
            else:
                add_member(tar, name, data)
            samples.add(name.partition(".")[0])
    return {"file": path.name, "num_samples": len(samples), "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def index_with(out: Path, shards: list[dict], split: str = "train") -> None:
    write_index(out, name="t", source="t", classes=CLASSES, split=split, preprocess={},
                split_entry={"num_samples": sum(s["num_samples"] for s in shards), "shards": shards})


def sample_members(key: str, label: bytes, jpg: bytes | None = None) -> list[tuple[str, bytes]]:
    jpg = jpg if jpg is not None else mini_files(CLASSES[0], 1)[0].read_bytes()
    return [(f"{key}.jpg", jpg), (f"{key}.cls", label), (f"{key}.json", b'{"source": "x"}')]


def link_member(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[str, tarfile.TarInfo]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return name, info


def zeros_gzip_tar(path: Path, size: int) -> None:
    """A gzip bomb: a tar holding `size` zero bytes, streamed (never in memory), compressed about 1000-fold."""
    class Zeros(io.RawIOBase):
        def __init__(self) -> None:
            self.left = size

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int:
            n = min(len(buffer), self.left)
            buffer[:n] = bytes(n)
            self.left -= n
            return n

    with gzip.open(path, "wb", compresslevel=9) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        info = tarfile.TarInfo("n00000001_zeros.JPEG")
        info.size = size
        tar.addfile(info, io.BufferedReader(Zeros()))


def subprocess_peak_rss_growth(code: str) -> tuple[int, str]:
    """Run `code` in a fresh interpreter; (growth of its peak RSS in MB while `code` ran, its stdout)."""
    script = ("import resource\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              f"{code}\n"
              "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "print('GROWTH_MB', (after - before) // 1024)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.split("GROWTH_MB")[1])
    return growth, result.stdout


# --- 1. paths stay inside their directories ------------------------------------------------------------------

@pytest.fixture(autouse=True)
def working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test works in its own directory: inspect writes its contact sheet into the working directory."""
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    return here


@pytest.fixture()
def outside_shard(tmp_path: Path) -> tuple[Path, dict]:
    """A dataset of one good shard, and a byte-identical copy of that shard outside the dataset directory."""
    out = uneven_dataset(tmp_path / "ds", [4])
    index = json.loads((out / "dataset.json").read_text())
    shutil.copy(out / "train-000000.tar", tmp_path / "outside.tar")
    return out, index


@pytest.mark.parametrize("entry", ["../outside.tar", "ABSOLUTE", "link.tar", "sub/train-000000.tar"])
def test_shard_entries_must_stay_in_the_dataset(entry: str, outside_shard: tuple[Path, dict], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    out, index = outside_shard
    if entry == "ABSOLUTE":
        entry = str(tmp_path / "outside.tar")
    (out / "link.tar").symlink_to(tmp_path / "outside.tar")
    (out / "sub").mkdir()
    shutil.copy(out / "train-000000.tar", out / "sub" / "train-000000.tar")
    index["splits"]["train"]["shards"][0]["file"] = entry
    (out / "dataset.json").write_text(json.dumps(index))

    for quick in ([], ["--quick"]):
        assert convert("verify", out, "--workers", "1", *quick) == 1
        output = capsys.readouterr().out
        assert f"shard entry {entry!r}" in output and "FAILED" in output
    assert convert("inspect", out, "--workers", "1") == 2
    assert f"shard entry {entry!r}" in one_error_line(capsys)
    assert not (out / "contact_sheet.png").exists() and not list(Path.cwd().glob(f"{out.name}_contact_sheet.png"))


def test_a_symlinked_shard_inside_the_dataset_is_fine(outside_shard: tuple[Path, dict],
                                                      capsys: pytest.CaptureFixture) -> None:
    out, index = outside_shard
    os.rename(out / "train-000000.tar", out / "real.tar")
    (out / "train-000000.tar").symlink_to("real.tar")
    assert convert("verify", out, "--workers", "1") == 0
    assert convert("inspect", out, "--workers", "1") == 0


def symlink_tree(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """SRC with two real classes and every kind of symlink; name in SRC -> what the default must record."""
    outside = image_tree(tmp_path / "outside", [CLASSES[5]], 3)
    src = image_tree(tmp_path / "src", CLASSES[:2], 3)
    a, b = CLASSES[0], CLASSES[1]
    real = mini_files(a, 1)[0].name
    links = {
        "parent": "..",  # the parent tree under a bogus class
        "escape": str(outside / CLASSES[5]),  # a class folder elsewhere
        "root": "/",  # the whole file system (/proc included)
        f"{a}/sub": str(outside / CLASSES[5]),  # a sub-folder link inside a class
        f"{a}/loop": ".",  # a loop
        f"{a}/stolen.JPEG": str(next((outside / CLASSES[5]).iterdir())),  # an image file outside
        f"{b}/alias.JPEG": f"../{a}/{real}",  # an image file inside SRC
        f"{b}/dangling.JPEG": "nowhere.JPEG",
    }
    for name, target in links.items():
        (src / name).symlink_to(target)
    return src, links


def test_imagefolder_follows_no_symlink_by_default(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, links = symlink_tree(tmp_path)
    out = tmp_path / "out"
    assert convert("imagefolder", src, out, "--workers", "2", "--max-reject-fraction", "1") == 0
    summary = capsys.readouterr().out
    samples = read_samples(out)
    assert sorted(samples) == sorted(f"{c}/{p.name}" for c in CLASSES[:2] for p in mini_files(c, 3))
    assert rejects_of(out) == {name: "symlink not followed" for name in links}
    assert f"symlink not followed: {len(links)}" in summary
    index = json.loads((out / "dataset.json").read_text())
    assert index["classes"] == sorted([*CLASSES[:2], "escape", "parent", "root"])  # linked classes keep an index
    assert {s["cls"] for s in samples.values()} == {index["classes"].index(c) for c in CLASSES[:2]}


def test_follow_symlinks_stays_inside_src_and_detects_loops(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, _ = symlink_tree(tmp_path)
    (src / "twin").symlink_to(CLASSES[0])  # sorts after the real class: must not steal its images
    (src / "aardvark").symlink_to(CLASSES[1])  # sorts before the real class: must not steal its images either
    out = tmp_path / "out"
    assert convert("imagefolder", src, out, "--workers", "2", "--max-reject-fraction", "1", "--follow-symlinks") == 0
    a, b = CLASSES[0], CLASSES[1]
    assert rejects_of(out) == {
        "parent": "symlink leads out of SRC", "escape": "symlink leads out of SRC", "root": "symlink leads out of SRC",
        f"{a}/sub": "symlink leads out of SRC", f"{a}/stolen.JPEG": "symlink leads out of SRC",
        f"{a}/loop": "symlink loop or folder already scanned", "twin": "symlink loop or folder already scanned",
        "aardvark": "symlink loop or folder already scanned", f"{b}/dangling.JPEG": "broken symlink",
    }
    samples = read_samples(out)
    expected = {f"{c}/{p.name}" for c in CLASSES[:2] for p in mini_files(c, 3)} | {f"{b}/alias.JPEG"}
    assert set(samples) == expected  # the in-SRC image link is followed, under the class it sits in
    index = json.loads((out / "dataset.json").read_text())
    assert samples[f"{b}/alias.JPEG"]["cls"] == index["classes"].index(b)
    assert samples[f"{b}/alias.JPEG"]["jpg"] == mini_files(a, 1)[0].read_bytes()


def test_imagenet22k_synset_tar_symlinks_are_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    src = tmp_path / "tars"
    src.mkdir()
    for wnid in CLASSES[:3]:
        (src / f"{wnid}.tar").write_bytes(synset_tar({p.name: p.read_bytes() for p in mini_files(wnid, 2)}))
    (elsewhere / f"{CLASSES[3]}.tar").write_bytes(synset_tar({"x.JPEG": mini_files(CLASSES[3], 1)[0].read_bytes()}))
    (src / f"{CLASSES[3]}.tar").symlink_to(elsewhere / f"{CLASSES[3]}.tar")
    (src / "notes.txt").write_text("not a synset tar\n")
    out = tmp_path / "out"
    assert convert("imagenet22k", src, out, "--workers", "1", "--max-reject-fraction", "1") == 0
    assert rejects_of(out) == {f"{CLASSES[3]}.tar": "symlink not followed", "notes.txt": "not a synset tar"}
    assert json.loads((out / "dataset.json").read_text())["classes"] == CLASSES[:4]  # the linked class keeps its index
    assert len(read_samples(out)) == 6


def test_gzip_bomb_member_is_rejected_with_bounded_memory_and_disk(tmp_path: Path) -> None:
    bomb = tmp_path / "n00000001.tar.gz"
    zeros_gzip_tar(bomb, 64 << 20)
    assert bomb.stat().st_size < 200_000
    spill = tmp_path / "spill"
    growth, stdout = subprocess_peak_rss_growth(
        "from pathlib import Path\n"
        "from data_tools.tars import Container, index_container\n"
        f"path = {str(bomb)!r}\n"
        "container = Container('n00000001', 'n00000001.tar.gz', path, 0, Path(path).stat().st_size)\n"
        f"print(index_container(container, Path({str(spill)!r}), max_gunzip_bytes=1 << 30))")
    assert "(None, [{'source': 'n00000001.tar.gz', 'reason': 'gzip member too large'" in stdout
    assert growth < 32  # MB: decompressed in blocks, never held whole
    assert not spill.exists() or not any(spill.rglob("*"))  # the partial spill file is removed


def test_release_tar_gzip_members_over_the_caps_are_rejected(tmp_path: Path) -> None:
    zeros_gzip_tar(tmp_path / "bomb.tar.gz", 16 << 20)  # ratio about 1000:1, far over the 100:1 cap
    big = synset_tar({p.name: p.read_bytes() for p in mini_files(CLASSES[2], 20)}, compress=True)  # ratio ~1
    release = tmp_path / "release.tar"
    with tarfile.open(release, "w") as outer:
        for wnid in CLASSES[:2]:
            add_member(outer, f"{wnid}.tar", synset_tar({p.name: p.read_bytes() for p in mini_files(wnid, 3)},
                                                        compress=True))
        add_member(outer, f"{CLASSES[2]}.tar", big)
        add_member(outer, "n00000001.tar", (tmp_path / "bomb.tar.gz").read_bytes())
    out = tmp_path / "out"
    cap = len(gzip.decompress(big)) - 1
    assert convert("imagenet22k", release, out, "--workers", "2", "--max-reject-fraction", "1",
                   "--max-gunzip-bytes", str(cap)) == 0
    assert rejects_of(out) == {f"{CLASSES[2]}.tar": "gzip member too large", "n00000001.tar": "gzip member too large"}
    index = json.loads((out / "dataset.json").read_text())
    assert index["classes"] == sorted([*CLASSES[:3], "n00000001"])  # rejected tars keep their class index
    assert len(read_samples(out)) == 6
    assert not (out / ".convert").exists()  # the spilled (and the partial) gunzipped tars are gone


def test_refuses_a_non_empty_out_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = image_tree(tmp_path / "src", CLASSES[:2], 3)
    out = tmp_path / "mine"
    out.mkdir()
    users = {"train-draft.tar.tmp": b"my notes", "rejected.jsonl": b"my own log, not json\n", "photo.jpg": b"x"}
    for name, data in users.items():
        (out / name).write_bytes(data)
    assert convert("imagefolder", src, out, "--workers", "1") == 2
    assert "not empty" in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == users  # nothing deleted, nothing added

    (tmp_path / "a_file").write_text("x")
    assert convert("imagefolder", src, tmp_path / "a_file", "--workers", "1") == 2
    assert "not a directory" in one_error_line(capsys)


def test_second_split_and_interrupted_scan_still_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = image_tree(tmp_path / "src", CLASSES[:2], 3)
    out = tmp_path / "ds"
    assert convert("imagefolder", src, out, "--workers", "1") == 0
    (out / "notes.txt").write_text("the user's notes beside the dataset\n")
    with open(out / "rejected.jsonl", "a") as f:
        f.write("a line someone added by hand\n")
    (out / ".convert" / "val").mkdir(parents=True)  # what a conversion killed while scanning leaves
    assert convert("imagefolder", src, out, "--split", "val", "--workers", "1") == 0
    index = json.loads((out / "dataset.json").read_text())
    assert sorted(index["splits"]) == ["train", "val"]
    assert "a line someone added by hand" in (out / "rejected.jsonl").read_text()  # kept, not a crash
    assert (out / "notes.txt").is_file()


def test_refuses_unlisted_shards_of_a_new_split_in_its_own_out(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = image_tree(tmp_path / "src", CLASSES[:2], 3)
    out = tmp_path / "ds"
    assert convert("imagefolder", src, out, "--workers", "1") == 0
    (out / "val-000000.tar").write_bytes(b"someone else's shard")
    assert convert("imagefolder", src, out, "--split", "val", "--workers", "1") == 2
    assert "val-000000.tar" in one_error_line(capsys)
    assert (out / "val-000000.tar").read_bytes() == b"someone else's shard"


# --- 2. no silent partial dataset ----------------------------------------------------------------------------

def small_release(path: Path, classes: int = 6, per_class: int = 2) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "w") as outer:
        for wnid in CLASSES[:classes]:
            add_member(outer, f"{wnid}.tar", synset_tar({p.name: p.read_bytes() for p in mini_files(wnid, per_class)}))
    with tarfile.open(path) as outer:
        return outer.getmembers()


@pytest.mark.parametrize("cut", ["member boundary", "inside a member", "inside a header", "end blocks missing"])
def test_truncated_release_tar_stops(cut: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    release = tmp_path / "winter21_whole.tar"
    members = small_release(release)
    last = members[-1]
    at = {"member boundary": members[3].offset, "inside a member": members[3].offset_data + 700,
          "inside a header": members[3].offset + 100,
          "end blocks missing": last.offset_data + -(-last.size // 512) * 512}[cut]
    with open(release, "r+b") as f:
        f.truncate(at)
    out = tmp_path / "out"
    assert convert("imagenet22k", release, out, "--workers", "1") == 2
    assert "is truncated: " in one_error_line(capsys)
    assert not (out / "dataset.json").exists() and not list(out.glob("*.tar"))


def test_truncated_synset_tars_are_rejected_not_shortened(tmp_path: Path) -> None:
    src = tmp_path / "tars"
    src.mkdir()
    for n, wnid in enumerate(CLASSES[:5]):
        members = {p.name: p.read_bytes() for p in mini_files(wnid, 3)}
        (src / f"{wnid}.tar").write_bytes(synset_tar(members, compress=n == 3))
    for wnid, where in ((CLASSES[1], "boundary"), (CLASSES[2], "inside")):
        path = src / f"{wnid}.tar"
        with tarfile.open(path) as tar:
            second = tar.getmembers()[1]
        with open(path, "r+b") as f:
            f.truncate(second.offset if where == "boundary" else second.offset_data + 100)
    gzipped = src / f"{CLASSES[3]}.tar"
    gzipped.write_bytes(gzipped.read_bytes()[: gzipped.stat().st_size // 2])  # a gzip stream cut in half
    out = tmp_path / "out"
    assert convert("imagenet22k", src, out, "--workers", "2", "--max-reject-fraction", "1") == 0
    assert rejects_of(out) == {f"{CLASSES[n]}.tar": "truncated tar" for n in (1, 2, 3)}
    assert json.loads((out / "dataset.json").read_text())["classes"] == CLASSES[:5]
    assert len(read_samples(out)) == 6


def test_expect_classes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = image_tree(tmp_path / "src", CLASSES[:3], 2)
    assert convert("imagefolder", src, tmp_path / "a", "--workers", "1", "--expect-classes", "4") == 2
    line = one_error_line(capsys)
    assert "3 classes" in line and "--expect-classes 4" in line
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())  # nothing written
    assert convert("imagefolder", src, tmp_path / "b", "--workers", "1", "--expect-classes", "3") == 0

    release = tmp_path / "release.tar"
    small_release(release, classes=5)
    assert convert("imagenet22k", release, tmp_path / "c", "--workers", "1", "--expect-classes", "19167") == 2
    assert "5 classes" in one_error_line(capsys)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_a_second_split_with_other_classes_stops_before_writing(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ds"
    assert convert("imagefolder", image_tree(tmp_path / "train", CLASSES[:3], 2), out, "--workers", "1") == 0
    capsys.readouterr()
    val = image_tree(tmp_path / "val", CLASSES[:2], 2)  # a class folder missing: every later label would shift
    assert convert("imagefolder", val, out, "--split", "val", "--workers", "1") == 2
    assert "lists other classes" in one_error_line(capsys)
    assert not list(out.glob("val-*")) and not (out / ".convert").exists()


def test_a_binary_classes_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "classes.txt").write_bytes(bytes(range(128, 256)))
    src = image_tree(tmp_path / "src", CLASSES[:1], 1)
    assert convert("imagenet22k", src, tmp_path / "out", "--classes", tmp_path / "classes.txt") == 2
    assert "is not a text file" in one_error_line(capsys)


MALFORMED = {  # dataset.json text -> what the one-line error names
    "null": ("null", "not a JSON object"),
    "list": ("[]", "not a JSON object"),
    "no format": ('{"classes": [], "splits": {}}', "format None"),
    "classes not a list": ('{"format": "largessl-wds/1", "classes": 3, "splits": {}}', "classes"),
    "classes not names": ('{"format": "largessl-wds/1", "classes": [1, 2], "splits": {}}', "classes"),
    "splits a list": ('{"format": "largessl-wds/1", "classes": [], "splits": []}', "splits"),
    "split a list": ('{"format": "largessl-wds/1", "classes": [], "splits": {"train": []}}', "splits.train"),
    "shards a dict": ('{"format": "largessl-wds/1", "classes": [], "splits": {"train": {"num_samples": 0, '
                      '"shards": {}}}}', "splits.train.shards"),
    "num_samples a string": ('{"format": "largessl-wds/1", "classes": [], "splits": {"train": {"num_samples": '
                             '"3", "shards": []}}}', "splits.train.num_samples"),
    "shard a string": ('{"format": "largessl-wds/1", "classes": [], "splits": {"train": {"num_samples": 0, '
                       '"shards": ["train-000000.tar"]}}}', "splits.train.shards[0]"),
    "shard count negative": ('{"format": "largessl-wds/1", "classes": [], "splits": {"train": {"num_samples": -1, '
                             '"shards": [{"file": "a.tar", "num_samples": -1, "bytes": 1, "sha256": "x"}]}}}',
                             "splits.train.num_samples"),
    "bytes a bool": ('{"format": "largessl-wds/1", "classes": [], "splits": {"train": {"num_samples": 1, '
                     '"shards": [{"file": "a.tar", "num_samples": 1, "bytes": true, "sha256": "x"}]}}}',
                     "splits.train.shards[0].bytes"),
    "file a list": ('{"format": "largessl-wds/1", "classes": [], "splits": {"train": {"num_samples": 1, '
                    '"shards": [{"file": ["a"], "num_samples": 1, "bytes": 1, "sha256": "x"}]}}}',
                    "splits.train.shards[0].file"),
    "not json": ("{", "not readable JSON"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_dataset_json_is_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text, named = MALFORMED[case]
    out = tmp_path / "ds"
    out.mkdir()
    (out / "dataset.json").write_text(text)
    for command in (["verify"], ["verify", "--quick"], ["inspect"]):
        assert convert(*command, out, "--workers", "1") == 2, command
        line = one_error_line(capsys)
        assert named in line, (command, line)
    src = image_tree(tmp_path / "src", CLASSES[:1], 1)
    assert convert("imagefolder", src, out, "--workers", "1") == 2  # nor does a converter write into it
    assert named in one_error_line(capsys)


def damage(case: str, out: Path) -> None:
    """Make the (valid) dataset OUT wrong in one way that only reading the shards or the index shows."""
    index = json.loads((out / "dataset.json").read_text())
    train = index["splits"]["train"]
    if case == "no splits":
        index["splits"] = {}
    elif case == "split without shards":
        train.update(num_samples=0, shards=[])
    elif case in ("shard is not a tar", "shard is empty", "tar without samples"):
        path = out / "train-000000.tar"
        if case == "shard is not a tar":
            path.write_bytes(b"certainly not a tar" * 100)
        elif case == "shard is empty":
            path.write_bytes(b"")
        else:
            with tarfile.open(path, "w"):
                pass
        entry = train["shards"][0]
        entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                     num_samples=0 if case == "tar without samples" else entry["num_samples"])
        train["num_samples"] = sum(s["num_samples"] for s in train["shards"])
    elif case == "shard is a directory":
        (out / "train-000000.tar").unlink()
        (out / "train-000000.tar").mkdir()
    elif case == "class listed twice":
        index["classes"][1] = index["classes"][0]
    (out / "dataset.json").write_text(json.dumps(index))


DAMAGE = {  # case -> (what verify's FAILED report names, inspect's exit code, what inspect's line names)
    "no splits": ("no splits", 2, "no splits"),
    "split without shards": ("split train has no shards", 0, ""),
    "shard is not a tar": ("train-000000.tar: not a readable tar", 2, "train-000000.tar"),
    "shard is empty": ("train-000000.tar: not a readable tar", 2, "train-000000.tar"),
    "tar without samples": ("train-000000.tar: holds no samples", 0, ""),
    "shard is a directory": ("train-000000.tar: not a regular file", 2, "not a regular file"),
    "class listed twice": (f"class {CLASSES[0]} is listed twice", 0, ""),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_verify_fails_and_inspect_copes_on_damaged_datasets(case: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    out = uneven_dataset(tmp_path / "ds", [3, 2])
    damage(case, out)
    named, inspect_code, inspect_named = DAMAGE[case]
    for quick in ([], ["--quick"]):
        assert convert("verify", out, "--workers", "1", *quick) == 1
        output = capsys.readouterr().out
        assert named in output and f"FAILED {out}" in output, output
    assert convert("inspect", out, "--workers", "1") == inspect_code
    if inspect_code:
        assert inspect_named in one_error_line(capsys)


def test_verify_names_link_and_folder_members(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    folder = tarfile.TarInfo("c.jpg")
    folder.type = tarfile.DIRTYPE
    entry = raw_shard(out / "train-000000.tar", [
        *sample_members("a", b"0"),
        link_member("b.jpg", "a.jpg"), ("b.cls", b"1"), ("b.json", b"{}"),
        ("c.jpg", folder), ("c.cls", b"1"), ("c.json", b"{}"),
        link_member("d.jpg", "a.jpg", tarfile.LNKTYPE), ("d.cls", b"1"), ("d.json", b"{}"),
        link_member("e.jpg", "/etc/passwd"), ("e.cls", b"1"), ("e.json", b"{}"),
    ])
    index_with(out, [entry])
    for quick in ([], ["--quick"]):
        assert convert("verify", out, "--workers", "1", *quick) == 1
        output = capsys.readouterr().out
        for name, kind in (("b.jpg", "symlink"), ("c.jpg", "directory"), ("d.jpg", "hard link"),
                           ("e.jpg", "symlink")):
            assert f"member {name} is a {kind}, not a regular file" in output, output
    assert convert("inspect", out, "--workers", "1") == 0


@pytest.mark.parametrize("labels", [[b"0", b"abc", b"99", b"-1", b"", b" 7 "], [b"x", b"10", b"-3"]],
                         ids=["some bad", "all bad"])
def test_inspect_counts_bad_labels_and_undecodable_images(labels: list[bytes], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    members = [m for n, label in enumerate(labels) for m in sample_members(f"s{n}", label)]
    members += [("broken.jpg", b"\xff\xd8 not really a jpeg"), ("broken.json", b"{}")]  # unlabelled, undecodable
    index_with(out, [raw_shard(out / "train-000000.tar", members)])
    here = Path.cwd()  # the test's own (working_directory)
    assert convert("inspect", out, "--workers", "1", "--samples", "8") == 0
    output = capsys.readouterr().out
    bad = sum(not (label.strip().isdigit() and int(label) < len(CLASSES)) for label in labels)
    assert f"{bad} sample(s) with a label that is not a class index" in output
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "train-000000.tar"]  # the dataset untouched
    assert f"contact sheet: {here / 'ds_contact_sheet.png'}" in output
    with Image.open(here / "ds_contact_sheet.png") as sheet:  # every sample shown, the undecodable one as a tile
        assert sheet.size == (min(8, len(labels) + 1) * 160, 160 + 14)


def huge_png(width: int, height: int) -> bytes:
    """A real PNG of width x height bilevel pixels: a few KB on disk, a decompression bomb in memory."""
    buffer = io.BytesIO()
    Image.new("1", (width, height), 1).save(buffer, format="PNG")
    return buffer.getvalue()


def test_too_many_pixels_is_its_own_reason(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = image_tree(tmp_path / "src", CLASSES[:1], 3)
    (src / CLASSES[0] / "big.png").write_bytes(huge_png(12000, 12000))  # 144 MP: over the default cap
    (src / CLASSES[0] / "bomb.png").write_bytes(huge_png(14000, 14000))  # 196 MP: over Pillow's own limit
    out = tmp_path / "out"
    assert convert("imagefolder", src, out, "--workers", "2", "--max-reject-fraction", "1") == 0
    assert rejects_of(out) == {f"{CLASSES[0]}/big.png": "too many pixels", f"{CLASSES[0]}/bomb.png": "too many pixels"}
    assert "too many pixels: 2" in capsys.readouterr().out


def test_max_pixels_counts_the_pixels_decoded(tmp_path: Path) -> None:
    src = tmp_path / "src" / CLASSES[0]
    src.mkdir(parents=True)
    with Image.open(mini_files(CLASSES[0], 1)[0]) as image:
        photo = image.convert("RGB").resize((2000, 1500))
    photo.save(src / "large.JPEG", quality=80)  # draft mode decodes it at 1/8: 250 x 188
    photo.save(src / "large.png")  # decoded in full: 3 MP
    cap = ["--max-pixels", "1000000", "--workers", "1", "--max-reject-fraction", "1"]
    assert convert("imagefolder", src.parent, tmp_path / "small", "--max-size", "100", *cap) == 0
    assert rejects_of(tmp_path / "small") == {f"{CLASSES[0]}/large.png": "too many pixels"}
    assert len(read_samples(tmp_path / "small")) == 1
    assert convert("imagefolder", src.parent, tmp_path / "full", *cap) == 0  # stored at full size: both too big
    assert rejects_of(tmp_path / "full") == {f"{CLASSES[0]}/large.png": "too many pixels",
                                             f"{CLASSES[0]}/large.JPEG": "too many pixels"}


def test_too_many_pixels_is_refused_before_decoding(tmp_path: Path) -> None:
    png = tmp_path / "big.png"
    png.write_bytes(huge_png(12000, 12000))
    growth, stdout = subprocess_peak_rss_growth(
        "from data_tools.images import Rejected, prepare\n"
        f"data = open({str(png)!r}, 'rb').read()\n"
        "try:\n"
        "    prepare(data, max_size=None, quality=90)\n"
        "except Rejected as exc:\n"
        "    print('REASON', exc.reason)")
    assert "REASON too many pixels" in stdout
    assert growth < 64  # MB; decoding it would take 18 MB as a bitmap and 432 MB as RGB
