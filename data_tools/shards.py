"""Write shard files (webdataset's TarWriter) and the dataset.json index of shard-format.md.

A shard is written under a temporary name unique to the writing process and renamed when complete, so a killed
writer never leaves a file with the final name that is not whole; dataset.json is replaced atomically and last.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

from data_tools.errors import ToolError

FORMAT = "largessl-wds/1"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ShardFile:
    """One `{split}-NNNNNN.tar`: samples appended in order; `close()` renames it into place and describes it."""

    def __init__(self, path: Path) -> None:
        from webdataset import TarWriter  # imported here: it pulls in torch, which verify and inspect do not need

        self.path = path
        self.tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        self.num_samples = self.payload_bytes = 0
        self._writer = TarWriter(str(self.tmp), encoder=False, mtime=0)  # fixed mtime: reproducible bytes

    def write(self, key: str, jpeg: bytes, label: int | None, meta: dict) -> None:
        sample = {"__key__": key, "jpg": jpeg, "json": json.dumps(meta, sort_keys=True).encode()}
        if label is not None:
            sample["cls"] = str(label).encode()
        self._writer.write(sample)
        self.num_samples += 1
        self.payload_bytes += len(jpeg)

    def close(self) -> dict:
        self._writer.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "num_samples": self.num_samples, "bytes": self.path.stat().st_size,
                "sha256": sha256_of(self.path)}


class SplitWriter:
    """Appends samples to consecutive shards of one split, starting a new shard at a sample or byte limit."""

    def __init__(self, out: Path, split: str, *, samples_per_shard: int, shard_bytes: int) -> None:
        self.out, self.split = out, split
        self.samples_per_shard, self.shard_bytes = samples_per_shard, shard_bytes
        self.shards: list[dict] = []
        self._shard: ShardFile | None = None

    def end_shard(self) -> None:
        if self._shard is not None:
            self.shards.append(self._shard.close())
            self._shard = None

    def write(self, key: str, jpeg: bytes, label: int | None, meta: dict) -> None:
        if self._shard is None:
            self._shard = ShardFile(self.out / shard_name(self.split, len(self.shards)))
        self._shard.write(key, jpeg, label, meta)
        if self._shard.num_samples >= self.samples_per_shard or self._shard.payload_bytes >= self.shard_bytes:
            self.end_shard()

    def finish(self) -> dict:
        self.end_shard()
        return {"num_samples": sum(s["num_samples"] for s in self.shards), "shards": self.shards}


def shard_path(root: Path, file: object) -> Path:
    """The path of a shard listed in ROOT/dataset.json as `file`; ValueError unless it names a plain file name
    inside ROOT (no directory part, no `..`, not absolute, not a symlink that leads out of ROOT).

    The one rule every reader of the index applies (largessl training, verify, inspect), so a hand-edited or
    hostile dataset.json cannot make any of them open a file outside the dataset directory."""
    path = root / plain_file_name(file)
    if path.is_symlink():
        real_root = root.resolve()
        if real_root not in path.resolve().parents:
            raise ValueError(f"shard entry {file!r} is a symlink to {path.resolve()}, outside {real_root}")
    return path


def plain_file_name(file: object) -> str:
    """`file` itself; ValueError unless it is a plain file name: no directory part, no `..`, not absolute. The text
    half of `shard_path`, also applied to datasets read from a URL (largessl/data/remote.py)."""
    if not isinstance(file, str) or not file or file in (".", "..") or "/" in file or "\\" in file or "\0" in file:
        raise ValueError(f"shard entry {file!r} is not a file name inside the dataset directory")
    return file


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def read_index(out: Path) -> dict:
    """OUT/dataset.json, checked to have the structure of shard-format.md ({} when there is none), so no reader
    of it meets a null, a list where an object belongs or a count that is a string; one line names what is wrong."""
    path = out / "dataset.json"
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ToolError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(index, dict):
        raise ToolError(f"{path} is malformed: not a JSON object (it is {json.dumps(index)[:40]})")
    if index.get("format") != FORMAT:
        raise ToolError(f"{path} has format {index.get('format')!r}, expected {FORMAT!r}")
    problems = index_problems(index)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ToolError(f"{path} is malformed: {problems[0]}{more}")
    return index


def index_problems(index: dict) -> list[str]:
    """What makes `index` not an index of shard-format.md: missing fields and fields of the wrong type."""
    problems = _field_problems(index, "", {"classes": _names, "splits": _object})
    for split, entry in (index.get("splits") if isinstance(index.get("splits"), dict) else {}).items():
        where = f"splits.{split}"
        if not isinstance(entry, dict):
            problems.append(f"{where} is {_shown(entry)}, not an object")
            continue
        problems += _field_problems(entry, f"{where}.", {"num_samples": _count, "shards": _list})
        for n, shard in enumerate(entry["shards"] if isinstance(entry.get("shards"), list) else []):
            if not isinstance(shard, dict):
                problems.append(f"{where}.shards[{n}] is {_shown(shard)}, not an object")
                continue
            problems += _field_problems(shard, f"{where}.shards[{n}].", {"file": _text, "num_samples": _count,
                                                                           "bytes": _count, "sha256": _text})
    return problems


def _field_problems(record: dict, prefix: str, fields: dict) -> list[str]:
    problems = []
    for name, (check, expected) in fields.items():
        if name not in record:
            problems.append(f"no {prefix}{name}")
        elif not check(record[name]):
            problems.append(f"{prefix}{name} is {_shown(record[name])}, not {expected}")
    return problems


def _shown(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(name, str) for name in value)


def _is_text(value: object) -> bool:
    return isinstance(value, str)


def _is_object(value: object) -> bool:
    return isinstance(value, dict)


def _is_list(value: object) -> bool:
    return isinstance(value, list)


_count = (_is_count, "a count (an integer >= 0)")
_text = (_is_text, "a string")
_names = (_is_names, "a list of class names")
_object = (_is_object, "an object")
_list = (_is_list, "a list")


def write_index(out: Path, *, name: str, source: str, classes: list[str], split: str, split_entry: dict,
                preprocess: dict, created: str | None = None) -> None:
    """Add or replace `split` in OUT/dataset.json, keeping the other splits (atomic replace)."""
    path = out / "dataset.json"
    index = read_index(out)
    if index.get("classes") and index["classes"] != classes:
        raise ToolError(f"{path} lists other classes than {source}; write to a new directory")
    splits = dict(index.get("splits", {}))
    splits[split] = split_entry
    index = {
        "format": FORMAT,
        "name": name,
        "created": created or utc_now(),
        "source": source,
        "classes": classes,
        "splits": dict(sorted(splits.items())),
        "preprocess": preprocess,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, path)
