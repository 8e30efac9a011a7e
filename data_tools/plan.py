"""From a scan to shards: class indices, unique keys, the held-out validation split, the global shuffle, and
which samples go into which shard. Everything here is a pure function of the scan and the options, so a resumed
conversion recomputes exactly the plan the killed one was following.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from data_tools.shards import shard_name
from data_tools.sources import Group, Scan, reject

TAR_OVERHEAD = 2048  # bytes per sample beyond the JPEG: three 512-byte headers, padding, the json member


@dataclass(frozen=True, slots=True)  # slots: ImageNet-22K plans hold 14M of these
class Item:
    """One planned sample: where its bytes are and what it becomes."""

    key: str
    label: int
    group: int  # index into scan.groups
    name: str
    offset: int
    size: int


@dataclass
class ShardPlan:
    split: str
    file: str
    items: list[Item]


def class_list(scan: Scan, listed: list[str] | None) -> tuple[list[str], list[dict]]:
    """Sorted wnids found (torchvision ImageFolder order), or the --classes list; groups of other classes are
    excluded and recorded (as exclusions, which do not count as rejects)."""
    found = sorted({g.wnid for g in scan.groups} | set(scan.empty_classes))
    if listed is None:
        return found, []
    known = set(listed)
    excluded = [reject(g.source, "class not in --classes", f"{len(g.members)} images") for g in scan.groups
                if g.wnid not in known]
    return listed, excluded


def sample_key(wnid: str, name: str) -> str:
    """`n01440764_10026` for `n01440764_10026.JPEG`; the class is prefixed when the file name lacks it."""
    stem = PurePosixPath(name).name.split(".")[0] or "image"
    key = stem if stem.startswith(wnid) else f"{wnid}_{stem}"
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


def items_by_class(scan: Scan, classes: list[str]) -> dict[str, list[Item]]:
    """Every member of a listed class as an Item with a dataset-unique key (clashes get `_1`, `_2`, ...)."""
    label = {wnid: i for i, wnid in enumerate(classes)}
    seen: set[str] = set()
    by_class: dict[str, list[Item]] = {}
    order = sorted(range(len(scan.groups)), key=lambda i: (scan.groups[i].wnid, scan.groups[i].source))
    for g in order:
        group: Group = scan.groups[g]
        if group.wnid not in label:
            continue
        for name, offset, size in group.members:
            key = base = sample_key(group.wnid, name)
            n = 0
            while key in seen:
                n += 1
                key = f"{base}_{n}"
            seen.add(key)
            by_class.setdefault(group.wnid, []).append(Item(key, label[group.wnid], g, name, offset, size))
    return by_class


def hold_out(by_class: dict[str, list[Item]], per_class: int, seed: int) -> tuple[list[Item], list[Item]]:
    """(train, val): `per_class` images of every class (at most half of it) chosen by a seeded draw."""
    train, val = [], []
    for wnid in sorted(by_class):
        items = by_class[wnid]
        take = set(random.Random(f"{seed}/val/{wnid}").sample(range(len(items)), min(per_class, len(items) // 2)))
        for i, item in enumerate(items):
            (val if i in take else train).append(item)
    return train, val


def shuffled(items: list[Item], seed: int, split: str) -> list[Item]:
    """Global shuffle: every shard mixes all classes; streaming readers only shuffle within a buffer."""
    items = list(items)
    random.Random(f"{seed}/{split}").shuffle(items)
    return items


def cut_into_shards(split: str, items: list[Item], per_shard: int, *, equal: bool) -> list[ShardPlan]:
    """ceil(len(items) / per_shard) shards, numbered in order. `equal`: of equal size (within one sample), as
    --shard-bytes plans them (its per_shard is an estimate from a mean size anyway); else exactly per_shard items
    each with the remainder in the last, what --samples-per-shard promises."""
    count = max(1, math.ceil(len(items) / per_shard)) if items else 0
    if not equal:
        return [ShardPlan(split, shard_name(split, i), items[i * per_shard:(i + 1) * per_shard]) for i in range(count)]
    return [ShardPlan(split, shard_name(split, i), items[i * len(items) // count:(i + 1) * len(items) // count])
            for i in range(count)]


def per_shard_for_bytes(shard_bytes: int, mean_sample_bytes: float) -> int:
    return max(1, int(shard_bytes // (mean_sample_bytes + TAR_OVERHEAD)))
