"""Make ImageNet-size JPEGs (500x375, about 110 KB, the ImageNet mean) from a class-folder tree, for converter
throughput benchmarks: each image is upscaled with a little sensor-like noise so it compresses like a photo.

    python benchmarks/imagenet_size_jpegs.py SRC DST [--per-class N]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageChops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--quality", type=int, default=94)
    args = parser.parse_args()
    rng = random.Random(0)
    total = 0
    for folder in sorted(p for p in args.src.iterdir() if p.is_dir()):
        (args.dst / folder.name).mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.glob("*.JPEG"))[: args.per_class]:
            with Image.open(path) as image:
                big = image.convert("RGB").resize((500, 375), Image.Resampling.BICUBIC)
            noise = Image.effect_noise((500, 375), 12).convert("RGB")
            noisy = ImageChops.add(big, noise, scale=1.0, offset=-128 + rng.randint(-2, 2))
            out = args.dst / folder.name / path.name
            noisy.save(out, format="JPEG", quality=args.quality)
            total += out.stat().st_size
    count = sum(1 for _ in args.dst.rglob("*.JPEG"))
    print(f"{count} images, mean {total / max(1, count) / 1000:.0f} KB")


if __name__ == "__main__":
    main()
