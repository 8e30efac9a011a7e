"""python -m data_tools imagefolder SRC OUT [--split NAME] ..."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_tools.imagefolder import convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    folder = commands.add_parser("imagefolder", help="class-folder tree -> one split of a shard dataset")
    folder.add_argument("src", type=Path, help="folder with one sub-folder of images per class")
    folder.add_argument("out", type=Path, help="dataset directory (created; other splits are kept)")
    folder.add_argument("--split", default="train", help="split name (default: train)")
    folder.add_argument("--samples-per-shard", type=int, default=10_000)
    folder.add_argument("--shard-bytes", type=int, default=1 << 30, help="start a new shard past this many bytes")
    folder.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    folder.add_argument("--quality", type=int, default=90, help="JPEG quality for converted images")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        parser.error(f"SRC '{args.src}' is not a directory")
    summary = convert(args.src, args.out, split=args.split, samples_per_shard=args.samples_per_shard,
                      shard_bytes=args.shard_bytes, seed=args.seed, quality=args.quality)
    print(f"{args.out} [{args.split}]: {summary['written']} images in {summary['shards']} shards, "
          f"{summary['rejected']} rejected (see rejected.jsonl)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
