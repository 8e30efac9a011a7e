"""python -m data_tools verify OUT: every number in dataset.json checked against the shards on disk.

Full: each listed shard exists with the recorded bytes and sha256, holds the recorded number of samples, every
sample has its members, a label in range and a JPEG that decodes, and keys are unique across the dataset.
`--quick`: sizes and sample counts only, from the tar headers (no hashing, no decoding).

Exit 0: OK. Exit 1: FAILED, one line per problem (a missing or damaged shard, a shard entry naming a file outside
the dataset directory, a link or folder member, no splits, ...). Exit 2: no dataset.json, or one whose structure
is not that of shard-format.md (shards.read_index names the first bad field). Nothing outside OUT is ever opened.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

from data_tools.errors import ToolError
from data_tools.parallel import process_context
from data_tools.progress import Progress
from data_tools.shards import read_index, sha256_of, shard_path

MAX_LISTED = 20


def verify(out: Path, *, quick: bool, workers: int) -> int:
    index = read_index(out)  # its structure is checked there: a malformed index is one line, exit 2
    if not index:
        raise ToolError(f"{out} has no dataset.json")
    problems = check_index(index)
    jobs = []
    for split, entry in sorted(index["splits"].items()):
        for n, shard in enumerate(entry["shards"]):
            try:
                path = shard_path(out, shard["file"])
            except ValueError as exc:  # never opened: it names a file outside the dataset directory
                problems.append(f"split {split} shards[{n}]: {exc}")
                continue
            jobs.append((str(path), split, shard, len(index["classes"]), quick))
    keys: dict[str, str] = {}
    progress = Progress(f"verifying {len(jobs)} shards" + (" (quick)" if quick else ""),
                        sum(s["num_samples"] for _, _, s, _, _ in jobs))
    with process_context().Pool(workers) as pool:
        done = 0
        for file, shard_problems, shard_keys, count in pool.imap(check_shard, jobs):
            problems += shard_problems
            for key in shard_keys:
                if key in keys:
                    problems.append(f"{file}: key {key} also in {keys[key]}")
                keys[key] = file
            done += count
            progress.update(done)
    progress.close()
    listed = {s["file"] for entry in index["splits"].values() for s in entry["shards"]}
    unlisted = sorted(p.name for p in out.glob("*.tar") if p.name not in listed)
    if unlisted:
        print(f"note: {len(unlisted)} tar file(s) not in dataset.json, e.g. {unlisted[0]}", file=sys.stderr)
    return report(out, index, problems, quick)


def check_index(index: dict) -> list[str]:
    """What is wrong with a well-formed index on its own: no splits, an empty split, counts that do not add up."""
    problems = [] if index["splits"] else ["dataset.json lists no splits"]
    for split, entry in sorted(index["splits"].items()):
        if not entry["shards"]:
            problems.append(f"split {split} has no shards")
        total = sum(s["num_samples"] for s in entry["shards"])
        if total != entry["num_samples"]:
            problems.append(f"split {split}: num_samples {entry['num_samples']} but its shards add up to {total}")
    seen = set()
    for name in index["classes"]:
        if name in seen:
            problems.append(f"class {name} is listed twice in classes")
        seen.add(name)
    return problems


def check_shard(job: tuple) -> tuple[str, list[str], list[str], int]:
    path, split, expected, num_classes, quick = job
    name = Path(path).name
    if not Path(path).exists():
        return name, [f"{name}: missing (listed in split {split})"], [], expected["num_samples"]
    if not Path(path).is_file():  # a folder, a FIFO (opening it would block), a device: never opened
        return name, [f"{name}: not a regular file (listed in split {split})"], [], expected["num_samples"]
    problems = []
    size = Path(path).stat().st_size
    if size != expected["bytes"]:
        problems.append(f"{name}: {size} bytes, dataset.json says {expected['bytes']}")
    if not quick and not problems and sha256_of(Path(path)) != expected["sha256"]:
        problems.append(f"{name}: sha256 differs from dataset.json (the file changed after it was written)")
    try:
        keys, sample_problems = read_samples(path, num_classes, decode=not quick)
    except (tarfile.TarError, OSError, EOFError) as exc:
        return name, problems + [f"{name}: not a readable tar ({exc})"], [], expected["num_samples"]
    problems += [f"{name}: {p}" for p in sample_problems[:MAX_LISTED]]
    if not keys:
        problems.append(f"{name}: holds no samples")
    if len(keys) != expected["num_samples"]:
        problems.append(f"{name}: {len(keys)} samples, dataset.json says {expected['num_samples']}")
    return name, problems, keys, expected["num_samples"]


def read_samples(path: str, num_classes: int, decode: bool) -> tuple[list[str], list[str]]:
    """Keys in order, and what is wrong with each sample (members grouped by key, webdataset convention)."""
    keys, problems, members = [], [], {}

    def close_sample() -> None:
        if keys:
            problems.extend(check_sample(keys[-1], members, num_classes, decode))
        members.clear()

    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isreg():  # a link is never followed, not even to another member
                problems.append(f"member {info.name} is a {member_kind(info)}, not a regular file")
                continue
            key, _, ext = info.name.partition(".")
            if not keys or key != keys[-1]:
                close_sample()
                keys.append(key)
            members[ext] = tar.extractfile(info).read() if decode or ext == "cls" else b""
        close_sample()
    return keys, problems


def member_kind(info: tarfile.TarInfo) -> str:
    kinds = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.DIRTYPE: "directory",
             tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}
    return kinds.get(info.type, f"member of type {info.type!r}")


def check_sample(key: str, members: dict[str, bytes], num_classes: int, decode: bool) -> list[str]:
    missing = [m for m in ("jpg", "json") if m not in members]
    if missing:
        return [f"sample {key} lacks {', '.join(missing)}"]
    problems = []
    if "cls" in members:
        try:
            label = int(members["cls"])
        except ValueError:
            label = -1
        if not 0 <= label < num_classes:
            problems.append(f"sample {key} has label {members['cls'][:20]!r}, not in 0..{num_classes - 1}")
    if decode:
        from PIL import Image  # here, not at module top: `verify` with a bad OUT reports before importing it

        try:
            json.loads(members["json"])
            with Image.open(io.BytesIO(members["jpg"])) as image:
                if image.format != "JPEG" or image.mode != "RGB":
                    problems.append(f"sample {key} is {image.format} {image.mode}, not an RGB JPEG")
                image.load()
        except Exception as exc:  # any decoder failure is a finding, never a crash
            problems.append(f"sample {key} does not decode ({type(exc).__name__}: {exc})")
    return problems


def report(out: Path, index: dict, problems: list[str], quick: bool) -> int:
    splits = ", ".join(f"{split} {entry['num_samples']:,} samples in {len(entry['shards'])} shards"
                       for split, entry in sorted(index["splits"].items())) or "no splits"
    checked = "sizes and counts" if quick else "bytes, sha256, counts, labels and decoding"
    if not problems:
        print(f"OK {out}: {splits}; {checked} match dataset.json")
        return 0
    for problem in problems[:MAX_LISTED]:
        print(f"  {problem}")
    if len(problems) > MAX_LISTED:
        print(f"  ... and {len(problems) - MAX_LISTED} more")
    print(f"FAILED {out}: {len(problems)} problem(s) ({splits})")
    return 1
