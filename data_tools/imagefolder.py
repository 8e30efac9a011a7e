"""A class-folder tree (ImageNet train/ or val/, Imagenette) -> one split of a shard dataset.

Labels come from the sorted folder names (torchvision ImageFolder order), never from file names.
RGB JPEGs are copied byte for byte; anything else that decodes is converted to an RGB JPEG (EXIF
orientation applied); files that do not decode are skipped and listed in rejected.jsonl.
"""

from __future__ import annotations

import io
import json
import random
import re
import sys
import time
from pathlib import Path

from PIL import Image, ImageOps

from data_tools.shards import SplitWriter, write_index

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(src: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(d.name for d in src.iterdir() if d.is_dir())
    files = [(f, label) for label, name in enumerate(classes)
             for f in sorted((src / name).rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    return classes, files


def as_rgb_jpeg(data: bytes, quality: int) -> tuple[bytes, int, int]:
    """(jpeg bytes, width, height): the input itself when it is already an RGB JPEG, else re-encoded."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        rotated = image.getexif().get(0x0112, 1) not in (1, None)
        if image.format == "JPEG" and image.mode == "RGB" and not rotated:
            return data, image.width, image.height
        converted = ImageOps.exif_transpose(image).convert("RGB")
    buffer = io.BytesIO()
    converted.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), converted.width, converted.height


def sample_key(path: Path, wnid: str, seen: set[str]) -> str:
    key = re.sub(r"[^A-Za-z0-9_-]", "_", f"{wnid}_{path.stem}")
    unique, n = key, 1
    while unique in seen:
        unique, n = f"{key}_{n}", n + 1
    seen.add(unique)
    return unique


def convert(src: Path, out: Path, *, split: str, samples_per_shard: int, shard_bytes: int, seed: int,
            quality: int) -> dict:
    classes, files = list_images(src)
    if not files:
        raise SystemExit(f"error: no images under class folders of {src}")
    random.Random(seed).shuffle(files)  # every shard mixes all classes
    out.mkdir(parents=True, exist_ok=True)
    writer = SplitWriter(out, split, samples_per_shard=samples_per_shard, shard_bytes=shard_bytes)
    rejected, seen, start = 0, set(), time.time()
    with open(out / "rejected.jsonl", "a") as rejects:
        for i, (path, label) in enumerate(files, 1):
            source = str(path.relative_to(src))
            try:
                jpeg, width, height = as_rgb_jpeg(path.read_bytes(), quality)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                rejects.write(json.dumps({"source": source, "split": split, "reason": str(exc)}) + "\n")
                rejected += 1
                continue
            meta = {"source": source, "wnid": classes[label], "width": width, "height": height}
            writer.write(sample_key(path, classes[label], seen), jpeg, label, meta)
            if i % 1000 == 0 or i == len(files):
                print(f"\r{split}: {i}/{len(files)} images, {i / (time.time() - start):.0f} img/s", end="",
                      file=sys.stderr, flush=True)
    print(file=sys.stderr)
    entry = writer.finish()
    write_index(out, name=out.name, source=str(src.resolve()), classes=classes, split=split, split_entry=entry,
                preprocess={"max_size": None, "jpeg_quality": quality, "shuffle_seed": seed})
    return {"written": entry["num_samples"], "rejected": rejected, "shards": len(entry["shards"])}
