"""The resumable conversion: scan -> plan -> shards written by a pool of workers -> rejected.jsonl -> dataset.json.
What a conversion is and the state it keeps between runs are in data_tools/conversion.py.

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
import shutil
import sys
import time
from pathlib import Path

from data_tools.conversion import (
    WORK_DIR,
    Conversion,
    already_complete,
    finished_shards,
    load_state,
    preprocess_entry,
    remove_if_empty,
    remove_stale_temporaries,
    write_json,
)
from data_tools.errors import PROG, ToolError
from data_tools.images import Rejected, prepare
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

NOT_COUNTED = {"class not in --classes"}  # exclusions the user asked for are recorded but are not rejects


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


# --- scan and plan -------------------------------------------------------------------------------------------


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

