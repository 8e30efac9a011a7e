"""What a conversion is (its command, paths and the options that decide the output bytes) and the state it keeps
in OUT/.convert/SPLITS/ between runs: the recorded plan, one record per finished shard, and the checks that decide
whether an OUT may be written or resumed (never over shards or a dataset this conversion did not write).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from data_tools.errors import ToolError
from data_tools.limits import DEFAULT_MAX_GUNZIP_BYTES, DEFAULT_MAX_PIXELS
from data_tools.plan import ShardPlan
from data_tools.shards import read_index

WORK_DIR = ".convert"
IGNORED_IN_OUT = {"lost+found"}  # what a fresh file system's root holds: still an empty OUT


@dataclass(frozen=True)
class Options:
    """Everything that decides the output bytes; a resumed conversion must be given the same."""

    max_size: int | None = None
    quality: int = 90
    seed: int = 0
    samples_per_shard: int | None = None
    shard_bytes: int = 1 << 30
    val_per_class: int = 0
    classes: tuple[str, ...] | None = None
    follow_symlinks: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_gunzip_bytes: int = DEFAULT_MAX_GUNZIP_BYTES


@dataclass(frozen=True)
class Conversion:
    command: str  # "imagefolder" or "imagenet22k"
    src: Path
    out: Path
    split: str  # imagefolder's split; imagenet22k writes "train" and, with --val-per-class, "val"
    options: Options
    workers: int
    max_reject_fraction: float = 0.01
    expect_classes: int | None = None  # stop before writing anything unless the class list has this length

    @property
    def splits(self) -> list[str]:
        if self.command == "imagefolder":
            return [self.split]
        return ["train", "val"] if self.options.val_per_class else ["train"]

    @property
    def work(self) -> Path:
        return self.out / WORK_DIR / "+".join(self.splits)

    def record(self) -> dict:
        return {"command": self.command, "src": str(self.src.resolve()), "splits": self.splits,
                "options": asdict(self.options)}


def load_state(conv: Conversion) -> dict | None:
    path = conv.work / "plan.json"
    if not path.is_file():
        refuse_foreign_shards(conv)
        return None
    state = json.loads(path.read_text())
    if state["record"] != conv.record():
        changed = [k for k in sorted(set(state["record"]["options"]) | set(conv.record()["options"]))
                   if state["record"]["options"].get(k) != conv.record()["options"].get(k)]
        what = ", ".join(changed) or "source or command"
        raise ToolError(f"{conv.out} holds an unfinished conversion started with other options ({what}); rerun it "
                        f"with the same options, or remove {conv.work} to start over")
    print(f"resuming the conversion in {conv.work}", file=sys.stderr)
    return state


def already_complete(conv: Conversion) -> bool:
    index = read_index(conv.out)
    present = [s for s in conv.splits if s in index.get("splits", {})]
    if not present:
        return False
    if index.get("preprocess") != preprocess_entry(conv.options) or len(present) != len(conv.splits):
        raise ToolError(f"{conv.out}/dataset.json already has split(s) {', '.join(present)} written with other "
                        f"options; write to a new directory")
    counts = ", ".join(f"{s} {index['splits'][s]['num_samples']:,} samples" for s in present)
    print(f"{conv.out} already complete ({counts}); nothing to do", file=sys.stderr)
    return True


def refuse_foreign_shards(conv: Conversion) -> None:
    """A conversion without a plan of its own writes only into an empty OUT or one this tool wrote (it holds our
    dataset.json, or our work directory), and never over shard files that its index does not list."""
    index = read_index(conv.out)  # a foreign or broken dataset.json stops here, in one line
    listed = {s["file"] for entry in index.get("splits", {}).values() for s in entry["shards"]}
    pattern = re.compile(rf"({'|'.join(map(re.escape, conv.splits))})-\d{{6}}\.tar$")
    names = sorted(p.name for p in conv.out.iterdir())
    foreign = [name for name in names if pattern.match(name) and name not in listed]
    if foreign:
        raise ToolError(f"{conv.out} already holds {foreign[0]} (and {len(foreign) - 1} more) not written by this "
                        f"conversion; write to a new directory or remove them")
    others = [name for name in names if name not in IGNORED_IN_OUT]
    if not index and WORK_DIR not in names and others:
        raise ToolError(f"OUT '{conv.out}' is not empty ({others[0]} and {len(others) - 1} more) and holds no dataset "
                        f"written by data_tools (no dataset.json, no {WORK_DIR}/); write to a new or empty directory")


def finished_shards(conv: Conversion, plans: list[ShardPlan]) -> dict[str, dict]:
    """Records of shards whose file is in place with the recorded size; anything else is rewritten."""
    done = {}
    for plan in plans:
        path = conv.work / "done" / f"{plan.file}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            shard = conv.out / plan.file
            if shard.is_file() and shard.stat().st_size == record["entry"]["bytes"]:
                done[plan.file] = record
    return done


def remove_stale_temporaries(conv: Conversion) -> None:
    """Shards a killed worker left half-written: exactly the names ShardFile gives them, nothing else."""
    pattern = re.compile(rf"({'|'.join(map(re.escape, conv.splits))})-\d{{6}}\.tar\.tmp\d+$")
    for tmp in conv.out.iterdir():
        if pattern.match(tmp.name) and tmp.is_file():
            tmp.unlink(missing_ok=True)


def remove_if_empty(directory: Path) -> None:
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()


def write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def preprocess_entry(options: Options) -> dict:
    return {"max_size": options.max_size, "jpeg_quality": options.quality, "shuffle_seed": options.seed}
