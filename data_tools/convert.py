"""The resumable conversion: scan -> plan -> shards written by a pool of workers -> rejected.jsonl -> dataset.json.

State lives in OUT/.convert/SPLITS/: the scan, the recorded options and one small record per finished shard. A
shard is finished when its record exists; everything else is redone from the plan, which is a pure function of
the scan and the options, so a conversion killed at any moment (SIGKILL included) and run again produces the same
bytes as one that was never interrupted. The work directory is removed once dataset.json is written.
"""

from __future__ import annotations

import collections
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from data_tools.errors import PROG, ToolError
from data_tools.images import Rejected, prepare
from data_tools.limits import DEFAULT_MAX_GUNZIP_BYTES, DEFAULT_MAX_PIXELS
from data_tools.plan import (
    ShardPlan,
    class_list,
    cut_into_shards,
    hold_out,
    items_by_class,
    per_shard_for_bytes,
    shuffled,
)
from data_tools.progress import Progress, duration, human_bytes
from data_tools.shards import read_index, utc_now, write_index
from data_tools.sources import Scan, read_member, scan_class_folders
from data_tools.tars import scan_imagenet22k
from data_tools.writing import close_handles, worker_pool, write_shard

WORK_DIR = ".convert"
IGNORED_IN_OUT = {"lost+found"}  # what a fresh file system's root holds: still an empty OUT
NOT_COUNTED = {"class not in --classes"}  # exclusions the user asked for are recorded but are not rejects


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


def run(conv: Conversion) -> int:
    """Convert (or finish converting); exit code 1 when rejects exceed the allowed fraction, else 0."""
    start = time.monotonic()
    make_out(conv.out)
    state = load_state(conv)
    if state is None and already_complete(conv):
        return 0
    conv.work.mkdir(parents=True, exist_ok=True)
    try:
        scan = load_or_scan(conv)
        classes, excluded = class_list(scan, list(conv.options.classes) if conv.options.classes else None)
        check_classes(conv, scan, classes)
    except ToolError:
        if state is None:  # nothing of this conversion exists yet: leave OUT as it was
            shutil.rmtree(conv.work)
            remove_if_empty(conv.out / WORK_DIR)
        raise
    if state is None:
        state = new_state(conv, scan, classes)
    plans = plan_shards(conv, scan, classes, state["per_shard"], equal=state.get("layout", "equal") == "equal")
    done = finished_shards(conv, plans)
    remove_stale_temporaries(conv)
    pending = [p for p in plans if p.file not in done]
    writing = write_pending(conv, scan, pending, done)
    code = finish(conv, scan, classes, excluded, plans, done, state["created"])
    images, workers = sum(len(p.items) for p in pending), min(conv.workers, len(pending)) or 1
    print(f"{images:,} images in {duration(time.monotonic() - start)}; writing shards: {images / writing:,.0f} "
          f"images/s with {workers} busy worker(s), {images / writing / workers:,.0f} per worker")
    return code


def make_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ToolError(f"OUT '{out}' exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ToolError(f"cannot create OUT '{out}': {exc.strerror or exc}") from None


def check_classes(conv: Conversion, scan: Scan, classes: list[str]) -> None:
    """--expect-classes guards the label space (a truncated source, a wrong SRC); --classes entries without any
    image are worth a note, since they silently become empty classes."""
    where = "listed in --classes" if conv.options.classes else f"found in {conv.src}"
    if conv.expect_classes is not None and len(classes) != conv.expect_classes:
        raise ToolError(f"{len(classes):,} classes {where}, but --expect-classes {conv.expect_classes}; nothing "
                        f"was written")
    existing = read_index(conv.out).get("classes")
    if existing and existing != classes:  # write_index would refuse too, but only after every shard was written
        raise ToolError(f"{conv.out}/dataset.json lists other classes ({len(existing):,}) than the {len(classes):,} "
                        f"{where}; every label would mean another class; write to a new directory")
    if conv.options.classes:
        found = {g.wnid for g in scan.groups}
        missing = [c for c in classes if c not in found]
        if missing:
            print(f"note: {len(missing):,} class(es) of --classes have no image in {conv.src} (e.g. {missing[0]}); "
                  f"they stay classes, with no samples", file=sys.stderr)


# --- state ---------------------------------------------------------------------------------------------------

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


def new_state(conv: Conversion, scan: Scan, classes: list[str]) -> dict:
    options = conv.options
    per_shard = options.samples_per_shard or per_shard_for_bytes(options.shard_bytes, mean_output_bytes(conv, scan))
    # layout "exact" (--samples-per-shard): per_shard samples per shard, the rest in the last; "equal"
    # (--shard-bytes): equal counts. A plan.json without "layout" was written before --samples-per-shard meant
    # exact counts: its conversion resumes with the equal cut its finished shards were written with.
    layout = "exact" if options.samples_per_shard else "equal"
    state = {"record": conv.record(), "created": utc_now(), "per_shard": per_shard, "layout": layout}
    write_json(conv.work / "plan.json", state)
    return state


def mean_output_bytes(conv: Conversion, scan: Scan, probe: int = 64) -> float:
    """Mean bytes of a stored JPEG: the input size when copying; measured on a fixed sample when resizing."""
    count = sum(len(g.members) for g in scan.groups)
    if not count:
        return 1.0
    if conv.options.max_size is None:
        return sum(m[2] for g in scan.groups for m in g.members) / count
    members = ((g, m) for g in scan.groups for m in g.members)  # a generator: ImageNet-22K has 14M members
    sizes, handles = [], {}
    for group, (name, offset, size) in itertools.islice(members, 0, None, max(1, count // probe)):
        if len(sizes) == probe:
            break
        try:
            data = read_member(group.kind, group.path, name, offset, size, handles)
            sizes.append(len(prepare(data, max_size=conv.options.max_size, quality=conv.options.quality,
                                     max_pixels=conv.options.max_pixels).jpeg))
        except (Rejected, OSError):
            continue
    close_handles(handles)
    return sum(sizes) / len(sizes) if sizes else 1.0


def load_or_scan(conv: Conversion) -> Scan:
    path = conv.work / "scan.jsonl.gz"
    if path.is_file():
        return Scan.load(path)
    if conv.command == "imagefolder":
        scan = scan_class_folders(conv.src, conv.options.follow_symlinks)
    else:
        progress = Progress("scanning synset tars", 0)

        def report(done: int, total: int) -> None:
            progress.total = total
            progress.update(done)

        with worker_pool(conv.workers, images=False) as (pool, _):  # reading tar headers: no torch
            scan = scan_imagenet22k(conv.src, conv.work / "gunzipped", pool, report,
                                    follow_symlinks=conv.options.follow_symlinks,
                                    max_gunzip_bytes=conv.options.max_gunzip_bytes)
        progress.close()
    scan.save(path)
    return scan


def plan_shards(conv: Conversion, scan: Scan, classes: list[str], per_shard: int, *, equal: bool) -> list[ShardPlan]:
    by_class = items_by_class(scan, classes)
    if conv.command == "imagefolder":
        splits = {conv.split: [item for wnid in sorted(by_class) for item in by_class[wnid]]}
    else:
        train, val = hold_out(by_class, conv.options.val_per_class, conv.options.seed)
        splits = {"train": train, "val": val} if conv.options.val_per_class else {"train": train}
    return [shard for split, items in splits.items()
            for shard in cut_into_shards(split, shuffled(items, conv.options.seed, split), per_shard, equal=equal)]


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


# --- workers -------------------------------------------------------------------------------------------------

def shard_task(conv: Conversion, scan: Scan, plan: ShardPlan) -> tuple:
    groups = scan.groups
    items = [(i.key, i.label, groups[i.group].kind, groups[i.group].path, groups[i.group].wnid,
              groups[i.group].source, i.name, i.offset, i.size) for i in plan.items]
    options = conv.options
    return str(conv.out / plan.file), plan.split, items, options.max_size, options.quality, options.max_pixels


def write_pending(conv: Conversion, scan: Scan, pending: list[ShardPlan], done: dict) -> float:
    """Write the pending shards in parallel, recording each as it completes; returns the seconds it took. The pool
    (and with it torch) starts only here, once every check of the input has passed."""
    if not pending:
        return float("inf")
    with worker_pool(conv.workers) as (pool, counter):
        return _write_pending(conv, pool, counter, scan, pending, done)


def _write_pending(conv: Conversion, pool, counter, scan: Scan, pending: list[ShardPlan], done: dict) -> float:
    if len(pending) < conv.workers:
        print(f"note: {len(pending)} shard(s) to write for {conv.workers} workers; a worker writes one shard at a "
              f"time, so smaller shards (--shard-bytes, --samples-per-shard) would use more cores", file=sys.stderr)
    total = sum(len(p.items) for p in pending)
    label = f"{'+'.join(conv.splits)} ({len(pending)} shards, {conv.workers} workers)"
    if done:
        label = f"{'+'.join(conv.splits)} (resumed: {len(done)} shards done, {len(pending)} to write)"
    progress = Progress(label, total)
    (conv.work / "done").mkdir(exist_ok=True)
    results = pool.imap_unordered(write_shard, (shard_task(conv, scan, p) for p in pending))
    while True:
        try:
            record = results.next(timeout=0.5)
        except multiprocessing.TimeoutError:
            progress.update(counter.value)
            continue
        except StopIteration:
            break
        write_json(conv.work / "done" / f"{record['entry']['file']}.json", record)
        done[record["entry"]["file"]] = record
        progress.update(counter.value)
    return progress.close()


# --- the end -------------------------------------------------------------------------------------------------

def preprocess_entry(options: Options) -> dict:
    return {"max_size": options.max_size, "jpeg_quality": options.quality, "shuffle_seed": options.seed}


def finish(conv: Conversion, scan: Scan, classes: list[str], excluded: list[dict], plans: list[ShardPlan],
           done: dict[str, dict], created: str) -> int:
    """rejected.jsonl, then dataset.json (last), then the summary; removes the work directory."""
    job = "+".join(conv.splits)
    scan_rejects = [{"split": job, **r} for r in scan.rejects + excluded]
    shard_rejects = [r for p in plans for r in done[p.file]["rejects"]]
    write_rejects(conv, scan_rejects + shard_rejects)
    for split in conv.splits:
        shards = [done[p.file]["entry"] for p in plans if p.split == split]
        entry = {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards}
        write_index(conv.out, name=conv.out.resolve().name, source=f"{conv.command} {conv.src.resolve()}",
                    classes=classes, split=split, split_entry=entry, preprocess=preprocess_entry(conv.options),
                    created=created)
    shutil.rmtree(conv.work)
    remove_if_empty(conv.out / WORK_DIR)
    return summarize(conv, plans, done, scan_rejects + shard_rejects, classes)


def write_rejects(conv: Conversion, rejects: list[dict]) -> None:
    """This conversion's rejects replace those an earlier run of the same splits wrote; other splits' stay, and so
    does any line that is not one of our records (someone's note): it is never ours to drop."""
    path = conv.out / "rejected.jsonl"
    kept = []
    if path.is_file():
        kept = [line for line in path.read_text(errors="replace").splitlines()
                if line.strip() and not set(conv.splits) & set(_splits_of(line))]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept + [json.dumps(r, sort_keys=True) for r in rejects]))
    os.replace(tmp, path)


def _splits_of(line: str) -> list[str]:
    try:
        record = json.loads(line)
    except ValueError:
        return []
    split = record.get("split") if isinstance(record, dict) else None
    return split.split("+") if isinstance(split, str) else []


def summarize(conv: Conversion, plans: list[ShardPlan], done: dict, rejects: list[dict], classes: list[str]) -> int:
    records = [done[p.file] for p in plans]
    written = sum(r["entry"]["num_samples"] for r in records)
    counted = [r for r in rejects if r["reason"] not in NOT_COUNTED]
    reasons = collections.Counter(r["reason"] for r in rejects)
    for split in conv.splits:
        shards = [r["entry"] for r in records if r["split"] == split]
        print(f"{conv.out} [{split}]: {sum(s['num_samples'] for s in shards):,} samples in {len(shards)} shards, "
              f"{human_bytes(sum(s['bytes'] for s in shards))}, {len(classes):,} classes")
    print(f"copied {sum(r['copied'] for r in records):,} JPEGs byte for byte, converted "
          f"{sum(r['converted'] for r in records):,}; rejected {len(counted):,}"
          + (f" ({', '.join(f'{k}: {v:,}' for k, v in sorted(reasons.items()))}; see rejected.jsonl)"
             if rejects else ""))
    fraction = len(counted) / max(1, written + len(counted))
    if fraction > conv.max_reject_fraction:
        print(f"{PROG}: error: {fraction:.2%} of the inputs were rejected, more than --max-reject-fraction "
              f"{conv.max_reject_fraction:g}; the dataset is written, check rejected.jsonl", file=sys.stderr)
        return 1
    return 0

