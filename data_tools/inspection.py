"""python -m data_tools inspect OUT: class histogram, shard-size statistics and a contact sheet of random samples."""

from __future__ import annotations

import io
import random
import statistics
import tarfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from data_tools.errors import ToolError
from data_tools.parallel import process_context
from data_tools.progress import human_bytes
from data_tools.shards import read_index, shard_path

if TYPE_CHECKING:  # PIL is imported where images are drawn: a bad OUT is reported before it is loaded
    from PIL import Image

THUMB = 160
CAPTION = 14
FULL_HISTOGRAM_UP_TO = 50  # classes; beyond that the extremes and quantiles are printed


def inspect(out: Path, *, split: str | None, sheet: Path | None, samples: int, seed: int, workers: int) -> int:
    index = read_index(out)  # its structure is checked there
    if not index:
        raise ToolError(f"{out} has no dataset.json")
    if not index["splits"]:
        raise ToolError(f"{out}/dataset.json lists no splits")
    splits = sorted(index["splits"]) if split is None else [split]
    if split is not None and split not in index["splits"]:
        raise ToolError(f"{out} has no split {split!r} (it has: {', '.join(sorted(index['splits']))})")
    classes = index["classes"]
    shards = [(split, s) for split in splits for s in index["splits"][split]["shards"]]
    paths = [checked_path(out, split, n, s["file"]) for split in splits
             for n, s in enumerate(index["splits"][split]["shards"])]
    print(f"{out}: {index.get('name')} ({index['format']}), {len(classes):,} classes, created {index.get('created')}")
    print(f"preprocess: {index.get('preprocess')}")
    with process_context().Pool(workers) as pool:
        results = pool.map(label_counts, [str(path) for path in paths])
    for (_, shard), (_, error) in zip(shards, results, strict=True):
        if error:
            raise ToolError(f"shard {shard['file']} listed in dataset.json is not a readable tar ({error}); "
                            f"run verify")
    for split in splits:
        entries = [s for sp, s in shards if sp == split]
        histogram = sum((c for (sp, _), (c, _) in zip(shards, results, strict=True) if sp == split), Counter())
        print(f"\n[{split}] {index['splits'][split]['num_samples']:,} samples in {len(entries):,} shards")
        print_shard_stats(entries)
        print_histogram(histogram, classes)
    path = sheet or default_sheet(out)
    contact_sheet(paths, classes, samples, seed).save(path)
    print(f"\ncontact sheet: {path}")
    return 0


def default_sheet(out: Path) -> Path:
    """Where the contact sheet goes without --sheet: the working directory, named after the dataset (a dataset
    directory is often shared or read-only, and is left as it is)."""
    return Path.cwd() / f"{out.resolve().name}_contact_sheet.png"


def checked_path(out: Path, split: str, n: int, file: str) -> Path:
    """The shard's path; one line when the entry leads out of the dataset or names no regular file."""
    try:
        path = shard_path(out, file)
    except ValueError as exc:
        raise ToolError(f"{out}/dataset.json split {split} shards[{n}]: {exc}") from None
    if not path.exists():
        raise ToolError(f"shard {file} listed in dataset.json is missing (run verify)")
    if not path.is_file():
        raise ToolError(f"shard {file} listed in dataset.json is not a regular file (run verify)")
    return path


def label_counts(path: str) -> tuple[Counter, str | None]:
    """Labels of one shard (or why it cannot be read), reading only the tiny .cls members: image bytes are skipped
    by seeking. A label that is not a decimal number counts as -1; verify names each bad one."""
    counts = Counter()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if info.isreg() and info.name.endswith(".cls"):
                    text = tar.extractfile(info).read()
                    counts[int(text) if text.strip().isdigit() else -1] += 1
    except (tarfile.TarError, OSError, EOFError) as exc:
        return counts, str(exc) or type(exc).__name__
    return counts, None


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
    bad = sum(n for label, n in histogram.items() if not 0 <= label < len(classes))
    if bad:
        print(f"{bad:,} sample(s) with a label that is not a class index (0..{len(classes) - 1}); run verify")
    if not histogram:
        print("no labels (unlabelled data)")
        return
    largest = max([n for n, _ in per_class] + [1])
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


def contact_sheet(paths: list[Path], classes: list[str], samples: int, seed: int) -> Image.Image:
    """A grid of random samples (from a few random shards), each captioned `index wnid`."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    chosen = rng.sample(paths, min(len(paths), 4))
    picks = [thumb for i, path in enumerate(chosen)
             for thumb in read_thumbnails(path, rng, -(-samples * (i + 1) // len(chosen))
                                          - -(-samples * i // len(chosen)), classes)]
    columns = min(8, max(1, len(picks)))
    rows = max(1, -(-len(picks) // columns))
    sheet = Image.new("RGB", (columns * THUMB, rows * (THUMB + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (thumb, caption) in enumerate(picks):
        x, y = (n % columns) * THUMB, (n // columns) * (THUMB + CAPTION)
        sheet.paste(thumb, (x, y))
        draw.text((x + 2, y + THUMB + 1), caption[:26], fill="black")
    return sheet


def read_thumbnails(path: Path, rng: random.Random, count: int, classes: list[str]) -> list[tuple[Image.Image, str]]:
    """`count` random samples of one shard as captioned thumbnails; only the chosen images are read and decoded,
    and one that does not decode (or has no image) is shown as a grey tile saying so."""
    with tarfile.open(path, mode="r:") as tar:
        by_key: dict[str, dict[str, tarfile.TarInfo]] = {}
        for info in tar:  # headers only
            if info.isreg():  # links are never followed
                key, _, ext = info.name.partition(".")
                by_key.setdefault(key, {})[ext] = info
        keys = rng.sample(sorted(by_key), min(count, len(by_key)))
        samples = [{ext: tar.extractfile(info).read() for ext, info in by_key[key].items() if ext in ("jpg", "cls")}
                   for key in keys]
    return [(thumbnail(members.get("jpg")), caption(members.get("cls"), classes)) for members in samples]


def thumbnail(jpeg: bytes | None) -> Image.Image:
    from PIL import Image, ImageDraw, ImageOps

    try:
        with Image.open(io.BytesIO(jpeg or b"")) as image:
            image.draft("RGB", (THUMB, THUMB))
            return ImageOps.fit(image.convert("RGB"), (THUMB, THUMB))
    except Exception:  # any decoder failure is shown, never a crash
        tile = Image.new("RGB", (THUMB, THUMB), "lightgrey")
        ImageDraw.Draw(tile).text((8, THUMB // 2), "no image" if jpeg is None else "does not decode", fill="black")
        return tile


def caption(label: bytes | None, classes: list[str]) -> str:
    if label is None:
        return "unlabelled"
    if label.strip().isdigit() and int(label) < len(classes):
        return f"{int(label)} {classes[int(label)]}"
    return f"bad label {label[:8]!r}"
