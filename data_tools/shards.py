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


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def read_index(out: Path) -> dict:
    path = out / "dataset.json"
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ToolError(f"{path} is not readable JSON ({exc})") from None
    if index.get("format") != FORMAT:
        raise ToolError(f"{path} has format {index.get('format')!r}, expected {FORMAT!r}")
    return index


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
