"""python -m data_tools inspect OUT: class histogram, shard-size statistics and a contact sheet of random samples."""

from __future__ import annotations

import io
import random
import statistics
import tarfile
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from data_tools.errors import ToolError
from data_tools.parallel import process_context
from data_tools.progress import human_bytes
from data_tools.shards import read_index

THUMB = 160
CAPTION = 14
FULL_HISTOGRAM_UP_TO = 50  # classes; beyond that the extremes and quantiles are printed


def inspect(out: Path, *, split: str | None, sheet: Path | None, samples: int, seed: int, workers: int) -> int:
    index = read_index(out)
    if not index:
        raise ToolError(f"{out} has no dataset.json")
    splits = sorted(index["splits"]) if split is None else [split]
    if split is not None and split not in index["splits"]:
        raise ToolError(f"{out} has no split {split!r} (it has: {', '.join(sorted(index['splits']))})")
    classes = index["classes"]
    print(f"{out}: {index.get('name')} ({index['format']}), {len(classes):,} classes, created {index.get('created')}")
    print(f"preprocess: {index.get('preprocess')}")
    shards = [(split, s) for split in splits for s in index["splits"][split]["shards"]]
    missing = [s["file"] for _, s in shards if not (out / s["file"]).is_file()]
    if missing:
        raise ToolError(f"shard {missing[0]} listed in dataset.json is missing (run verify)")
    with process_context().Pool(workers) as pool:
        counts = pool.map(label_counts, [str(out / s["file"]) for _, s in shards])
    for split in splits:
        entries = [s for sp, s in shards if sp == split]
        histogram = sum((c for (sp, _), c in zip(shards, counts, strict=True) if sp == split), Counter())
        print(f"\n[{split}] {index['splits'][split]['num_samples']:,} samples in {len(entries):,} shards")
        print_shard_stats(entries)
        print_histogram(histogram, classes)
    path = sheet or out / "contact_sheet.png"
    contact_sheet(out, [s for _, s in shards], classes, samples, seed).save(path)
    print(f"\ncontact sheet: {path}")
    return 0


def label_counts(path: str) -> Counter:
    """Labels of one shard, reading only the tiny .cls members (image bytes are skipped by seeking)."""
    counts = Counter()
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if info.name.endswith(".cls"):
                text = tar.extractfile(info).read()
                counts[int(text) if text.strip().isdigit() else -1] += 1  # -1: a bad label (verify names it)
    return counts


def print_shard_stats(entries: list[dict]) -> None:
    sizes = [s["bytes"] for s in entries]
    counts = [s["num_samples"] for s in entries]
    if not entries:
        return
    print(f"shard bytes:   min {human_bytes(min(sizes))}, median {human_bytes(statistics.median(sizes))}, "
          f"max {human_bytes(max(sizes))}, total {human_bytes(sum(sizes))}")
    print(f"shard samples: min {min(counts):,}, median {statistics.median(counts):,.0f}, max {max(counts):,}; "
          f"mean image {human_bytes(sum(sizes) / max(1, sum(counts)))} (with tar overhead)")


def print_histogram(histogram: Counter, classes: list[str]) -> None:
    per_class = [(histogram.get(i, 0), i) for i in range(len(classes))]
    if not histogram:
        print("no labels (unlabelled data)")
        return
    largest = max(n for n, _ in per_class)
    if len(classes) <= FULL_HISTOGRAM_UP_TO:
        for n, i in per_class:
            print(f"  {i:>5} {classes[i]:<12} {n:>9,} {'#' * round(40 * n / largest)}")
        return
    values = sorted(n for n, _ in per_class)
    q = statistics.quantiles(values, n=4)
    print(f"images per class: min {values[0]:,}, quartiles {q[0]:,.0f} / {q[1]:,.0f} / {q[2]:,.0f}, "
          f"max {values[-1]:,}; {sum(1 for v in values if v == 0):,} classes empty")
    ranked = sorted(per_class)
    print("  fewest: " + ", ".join(f"{classes[i]} {n:,}" for n, i in ranked[:5]))
    print("  most:   " + ", ".join(f"{classes[i]} {n:,}" for n, i in ranked[-5:][::-1]))


def contact_sheet(out: Path, shards: list[dict], classes: list[str], samples: int, seed: int) -> Image.Image:
    """A grid of random samples (from a few random shards), each captioned `index wnid`."""
    rng = random.Random(seed)
    chosen = rng.sample(shards, min(len(shards), 4))
    picks = [thumb for i, shard in enumerate(chosen)
             for thumb in read_thumbnails(out / shard["file"], rng, -(-samples * (i + 1) // len(chosen))
                                          - -(-samples * i // len(chosen)))]
    columns = min(8, max(1, len(picks)))
    rows = max(1, -(-len(picks) // columns))
    sheet = Image.new("RGB", (columns * THUMB, rows * (THUMB + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (thumb, label) in enumerate(picks):
        x, y = (n % columns) * THUMB, (n // columns) * (THUMB + CAPTION)
        sheet.paste(thumb, (x, y))
        caption = "unlabelled" if label is None else f"{label} {classes[label]}"
        draw.text((x + 2, y + THUMB + 1), caption[:26], fill="black")
    return sheet


def read_thumbnails(path: Path, rng: random.Random, count: int) -> list[tuple[Image.Image, int | None]]:
    """`count` random samples of one shard as thumbnails; only the chosen images are read and decoded."""
    with tarfile.open(path, mode="r:") as tar:
        by_key: dict[str, dict[str, tarfile.TarInfo]] = {}
        for info in tar:  # headers only
            key, _, ext = info.name.partition(".")
            by_key.setdefault(key, {})[ext] = info
        keys = rng.sample(sorted(by_key), min(count, len(by_key)))
        samples = [{ext: tar.extractfile(info).read() for ext, info in by_key[key].items() if ext in ("jpg", "cls")}
                   for key in keys]
    thumbs = []
    for members in samples:
        if "jpg" not in members:
            continue
        with Image.open(io.BytesIO(members["jpg"])) as image:
            image.draft("RGB", (THUMB, THUMB))
            thumb = ImageOps.fit(image.convert("RGB"), (THUMB, THUMB))
        thumbs.append((thumb, int(members["cls"]) if "cls" in members else None))
    return thumbs
