"""Read a dataset's index (dataset.json, shard-format.md) and check its shards are there."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data_tools.shards import shard_path
from largessl.errors import DataError

FORMAT = "largessl-wds/1"


@dataclass(frozen=True)
class Shard:
    path: str
    num_samples: int


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


def _read_index(root: Path, what: str) -> dict:
    if not root.is_dir():
        raise DataError(f"{what}: dataset directory '{root}' does not exist")
    index_path = root / "dataset.json"
    if not index_path.is_file():
        raise DataError(f"{what}: '{root}' has no dataset.json (see docs/shard-format.md; "
                        "python -m data_tools imagefolder writes one)")
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what}: {index_path} is not valid JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else None
        raise DataError(f"{what}: {index_path} has format {found!r}; this largessl reads '{FORMAT}'")
    return index


def open_split(root: str, split: str, what: str = "data.train") -> SplitIndex:
    """The split's shards, after checking the index is well formed, non-empty and every shard exists."""
    root_path = Path(root).expanduser()
    index = _read_index(root_path, what)
    splits = index.get("splits") or {}
    if split not in splits:
        raise DataError(f"{what}: dataset '{root}' has no split '{split}' (it has: {', '.join(splits) or 'none'})")
    try:
        entries = [(s["file"], int(s["num_samples"])) for s in splits[split]["shards"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{what}: split '{split}' in {root_path / 'dataset.json'} is malformed ({exc!r})") from None
    if any(count < 0 for _, count in entries):
        raise DataError(f"{what}: split '{split}' in {root_path / 'dataset.json'} has a negative num_samples")
    try:
        shards = tuple(Shard(str(shard_path(root_path, file)), count) for file, count in entries)
    except ValueError as exc:
        raise DataError(f"{what}: {root_path / 'dataset.json'}: {exc}; refusing to read it") from None
    result = SplitIndex(str(root_path), split, shards, tuple(index.get("classes") or ()))
    if result.num_samples == 0:
        raise DataError(f"{what}: split '{split}' of dataset '{root}' is empty (0 samples)")
    missing = [s.path for s in shards if not Path(s.path).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"missing shard {missing[0]}{more} (listed in {root_path / 'dataset.json'})")
    return result
