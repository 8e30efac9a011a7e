"""Read a dataset's index (dataset.json, shard-format.md) and check its shards are there.

A dataset is a local directory, an http(s) base URL or a pipe: command (data/remote.py); a shard's `path` is then
the file's path, its URL or the command that prints it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

from data_tools.shards import shard_path
from largessl.data import remote
from largessl.errors import DataError

FORMAT = "largessl-wds/1"


@dataclass(frozen=True)
class Shard:
    path: str  # a file path, a URL or a pipe: command
    num_samples: int
    dataset: str = ""  # the dataset it is listed in (directory, base URL or pipe: command with {})

    @property
    def home(self) -> str:
        """The dataset the shard belongs to, for messages."""
        return self.dataset or str(Path(self.path).parent)


@dataclass(frozen=True)
class SplitIndex:
    """One split of a dataset: its shards in index order and their sample counts."""

    root: str
    split: str
    shards: tuple[Shard, ...]
    classes: tuple[str, ...]

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


class _Source(NamedTuple):
    root: str  # as SplitIndex.root
    index_at: str  # where dataset.json was read
    content: dict
    locate: Callable[[object], str]  # a shard's `file` -> its path, URL or command; ValueError when it is unsafe


def _source(root: str, what: str) -> _Source:
    if remote.kind(root) == "local":
        root_path = Path(root).expanduser()
        index_path = root_path / "dataset.json"
        return _Source(str(root_path), str(index_path), _read_index(root_path, what), partial(_local_shard, root_path))
    base = remote.dataset_root(root, what)
    index_at = remote.file_location(base, "dataset.json")
    try:
        text = remote.read_all(index_at)  # the way the shards are read
    except remote.RemoteError as exc:
        raise DataError(f"{what}: cannot read {index_at} ({exc.reason})") from None
    return _Source(base, index_at, _parse_index(text, index_at, what), partial(remote.file_location, base))


def _local_shard(root: Path, file: object) -> str:
    return str(shard_path(root, file))


def _read_index(root: Path, what: str) -> dict:
    if not root.is_dir():
        raise DataError(f"{what}: dataset directory '{root}' does not exist")
    index_path = root / "dataset.json"
    if not index_path.is_file():
        raise DataError(f"{what}: '{root}' has no dataset.json (see docs/shard-format.md; "
                        "python -m data_tools imagefolder writes one)")
    return _parse_index(index_path.read_text(), str(index_path), what)


def _parse_index(text: str | bytes, index_path: str, what: str) -> dict:
    try:
        index = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what}: {index_path} is not valid JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else None
        raise DataError(f"{what}: {index_path} has format {found!r}; this largessl reads '{FORMAT}'")
    return index


def open_split(root: str, split: str, what: str = "data.train") -> SplitIndex:
    """The split's shards, after checking the index is well formed, non-empty and every shard exists."""
    source = _source(root, what)
    index = source.content
    splits = index.get("splits") or {}
    if split not in splits:
        raise DataError(f"{what}: dataset '{root}' has no split '{split}' (it has: {', '.join(splits) or 'none'})")
    try:
        entries = [(s["file"], int(s["num_samples"])) for s in splits[split]["shards"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{what}: split '{split}' in {source.index_at} is malformed ({exc!r})") from None
    if any(count < 0 for _, count in entries):
        raise DataError(f"{what}: split '{split}' in {source.index_at} has a negative num_samples")
    try:
        shards = tuple(Shard(source.locate(file), count, source.root) for file, count in entries)
    except ValueError as exc:
        raise DataError(f"{what}: {source.index_at}: {exc}; refusing to read it") from None
    result = SplitIndex(source.root, split, shards, tuple(index.get("classes") or ()))
    if result.num_samples == 0:
        raise DataError(f"{what}: split '{split}' of dataset '{root}' is empty (0 samples)")
    _check_present(shards, source.index_at, what)
    return result


def _check_present(shards: tuple[Shard, ...], index_at: str, what: str) -> None:
    """Every shard is there: a file, or for a URL a HEAD request each (data/remote.py; pipe: is not checked)."""
    try:
        missing = remote.missing([s.path for s in shards])
    except remote.RemoteError as exc:
        raise DataError(f"{what}: cannot check shard {exc.location} ({exc.reason})") from None
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"missing shard {missing[0]}{more} (listed in {index_at})")
