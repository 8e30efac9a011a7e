"""Write one split of a shard dataset: tar shards (webdataset's TarWriter) plus dataset.json.

Shards are written under a temporary name and renamed when complete; dataset.json is written last.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

from webdataset import TarWriter

FORMAT = "largessl-wds/1"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SplitWriter:
    """Appends samples to `{split}-NNNNNN.tar` shards, starting a new shard at a sample or byte limit."""

    def __init__(self, out: Path, split: str, *, samples_per_shard: int, shard_bytes: int) -> None:
        self.out, self.split = out, split
        self.samples_per_shard, self.shard_bytes = samples_per_shard, shard_bytes
        self.shards: list[dict] = []
        self._writer: TarWriter | None = None
        self._count = self._bytes = 0

    def _path(self, number: int) -> Path:
        return self.out / f"{self.split}-{number:06d}.tar"

    def _open(self) -> None:
        tmp = self._path(len(self.shards)).with_suffix(".tar.tmp")
        self._writer = TarWriter(str(tmp), encoder=False, mtime=0)  # fixed mtime: reproducible bytes
        self._count = self._bytes = 0

    def end_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        final = self._path(len(self.shards))
        os.replace(final.with_suffix(".tar.tmp"), final)
        self.shards.append({"file": final.name, "num_samples": self._count, "bytes": final.stat().st_size,
                            "sha256": sha256_of(final)})

    def write(self, key: str, jpeg: bytes, label: int | None, meta: dict) -> None:
        if self._writer is None:
            self._open()
        sample = {"__key__": key, "jpg": jpeg, "json": json.dumps(meta, sort_keys=True).encode()}
        if label is not None:
            sample["cls"] = str(label).encode()
        self._writer.write(sample)
        self._count += 1
        self._bytes += len(jpeg)
        if self._count >= self.samples_per_shard or self._bytes >= self.shard_bytes:
            self.end_shard()

    def finish(self) -> dict:
        self.end_shard()
        return {"num_samples": sum(s["num_samples"] for s in self.shards), "shards": self.shards}


def write_index(out: Path, *, name: str, source: str, classes: list[str], split: str, split_entry: dict,
                preprocess: dict) -> None:
    """Add or replace `split` in OUT/dataset.json, keeping the other splits (atomic replace)."""
    path = out / "dataset.json"
    index = json.loads(path.read_text()) if path.is_file() else {}
    if index.get("classes") and index["classes"] != classes:
        raise SystemExit(f"error: {path} lists other classes than {source}; write to a new directory")
    splits = dict(index.get("splits", {}))
    splits[split] = split_entry
    index = {
        "format": FORMAT,
        "name": name,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": source,
        "classes": classes,
        "splits": splits,
        "preprocess": preprocess,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, path)
