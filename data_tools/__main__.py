"""python -m data_tools {imagefolder,imagenet22k,verify,inspect}: write, check and look at shard datasets."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from data_tools.errors import ToolError
from data_tools.limits import DEFAULT_MAX_GUNZIP_BYTES, DEFAULT_MAX_PIXELS, GUNZIP_MAX_RATIO


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def size_in_bytes(text: str) -> int:
    """`1GB`, `500MB`, `1073741824`."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return positive(str(int(float(upper[: -len(unit)]) * factor)))
    return positive(upper)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_convert_options(parser: argparse.ArgumentParser) -> None:
    sizing = parser.add_mutually_exclusive_group()
    sizing.add_argument("--shard-bytes", type=size_in_bytes, default=2**30,
                        help="target shard size, e.g. 1GB or 500MB (default 1 GiB); shards of a split hold equal "
                             "sample counts, planned from the mean stored image size")
    sizing.add_argument("--samples-per-shard", type=positive, help="fixed samples per shard instead")
    parser.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default 0)")
    parser.add_argument("--max-size", type=positive,
                        help="shrink so the short side is at most N pixels (never enlarges; default: keep size)")
    parser.add_argument("--quality", type=int, default=90, choices=range(1, 101), metavar="1-100",
                        help="JPEG quality of converted images (default 90); RGB JPEGs within size are copied")
    parser.add_argument("--workers", type=positive, default=default_workers(),
                        help=f"worker processes (default: all cores, {default_workers()} here)")
    parser.add_argument("--max-reject-fraction", type=float, default=0.01,
                        help="exit non-zero when more than this fraction of inputs is rejected (default 0.01)")
    parser.add_argument("--expect-classes", type=positive, metavar="N",
                        help="stop before writing anything unless there are exactly N classes (ImageNet-22K "
                             "winter21: 19167, fall11: 21841; ImageNet-1K: 1000)")
    parser.add_argument("--max-pixels", type=positive, default=DEFAULT_MAX_PIXELS,
                        help=f"reject an image with more pixels than this (default {DEFAULT_MAX_PIXELS:,}), read "
                             "from its header before decoding; for a JPEG shrunk by --max-size, the pixels of its "
                             "reduced draft-mode decode")
    parser.add_argument("--follow-symlinks", action="store_true",
                        help="follow symlinks that resolve inside SRC, each folder once (default: follow none; "
                             "every symlink is recorded in rejected.jsonl)")


def read_classes(path: Path) -> tuple[str, ...]:
    try:
        names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ToolError(f"cannot read --classes {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ToolError(f"--classes {path} is not a text file (one wnid per line)") from None
    if len(set(names)) != len(names):
        raise ToolError(f"--classes {path} lists a class twice")
    if not names:
        raise ToolError(f"--classes {path} lists no class")
    return tuple(names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    folder = commands.add_parser("imagefolder", help="class-folder tree -> one split of a shard dataset")
    folder.add_argument("src", type=Path, help="folder with one sub-folder of images per class")
    folder.add_argument("out", type=Path, help="dataset directory (created; other splits are kept)")
    folder.add_argument("--split", default="train", help="split name (default: train)")
    add_convert_options(folder)

    in22k = commands.add_parser("imagenet22k", help="ImageNet-22K release -> train (and val) splits")
    in22k.add_argument("src", type=Path,
                       help="fall11_whole.tar / winter21_whole.tar, a directory of per-synset tars, or a directory "
                            "of synset folders")
    in22k.add_argument("out", type=Path, help="dataset directory (created)")
    in22k.add_argument("--classes", type=Path, help="file with one wnid per line: the classes and their order "
                                                    "(default: the sorted wnids found)")
    in22k.add_argument("--val-per-class", type=int, default=0,
                       help="hold out N images per class as split 'val' (seeded; at most half a class)")
    in22k.add_argument("--max-gunzip-bytes", type=size_in_bytes, default=DEFAULT_MAX_GUNZIP_BYTES,
                       help=f"reject a gzip-compressed synset tar that decompresses to more than this (default "
                            f"{DEFAULT_MAX_GUNZIP_BYTES >> 30}GiB) or to more than {GUNZIP_MAX_RATIO}x its "
                            f"compressed size")
    add_convert_options(in22k)

    verify = commands.add_parser("verify", help="check every shard against dataset.json")
    verify.add_argument("out", type=Path, help="dataset directory")
    verify.add_argument("--quick", action="store_true", help="sizes and sample counts only (no hashing or decoding)")
    verify.add_argument("--workers", type=positive, default=default_workers())

    inspect = commands.add_parser("inspect", help="class histogram, shard sizes and a contact sheet")
    inspect.add_argument("out", type=Path, help="dataset directory")
    inspect.add_argument("--split", help="only this split (default: all)")
    inspect.add_argument("--sheet", type=Path, help="contact-sheet PNG path (default: OUT/contact_sheet.png)")
    inspect.add_argument("--samples", type=positive, default=48, help="images on the contact sheet (default 48)")
    inspect.add_argument("--seed", type=int, default=0)
    inspect.add_argument("--workers", type=positive, default=default_workers())
    return parser


def convert_command(args: argparse.Namespace) -> int:
    from data_tools.convert import Conversion, Options, run

    if not args.src.exists():
        raise ToolError(f"SRC '{args.src}' does not exist")
    if args.command == "imagefolder" and not args.src.is_dir():
        raise ToolError(f"SRC '{args.src}' is not a directory")
    if args.out.resolve() == args.src.resolve() or args.src.resolve() in args.out.resolve().parents:
        raise ToolError(f"OUT '{args.out}' must not be inside SRC")
    if args.command == "imagefolder" and not re.fullmatch(r"[A-Za-z0-9_]+", args.split):
        raise ToolError(f"--split must be letters, digits or _ (it names the shard files), got {args.split!r}")
    if not 0 <= args.max_reject_fraction <= 1:
        raise ToolError(f"--max-reject-fraction must be between 0 and 1, got {args.max_reject_fraction}")
    classes = read_classes(args.classes) if getattr(args, "classes", None) else None
    if getattr(args, "val_per_class", 0) < 0:
        raise ToolError("--val-per-class must be 0 or more")
    options = Options(max_size=args.max_size, quality=args.quality, seed=args.seed,
                      samples_per_shard=args.samples_per_shard,
                      shard_bytes=args.shard_bytes, val_per_class=getattr(args, "val_per_class", 0), classes=classes,
                      follow_symlinks=args.follow_symlinks, max_pixels=args.max_pixels,
                      max_gunzip_bytes=getattr(args, "max_gunzip_bytes", DEFAULT_MAX_GUNZIP_BYTES))
    return run(Conversion(args.command, args.src, args.out, getattr(args, "split", "train"), options, args.workers,
                          args.max_reject_fraction, args.expect_classes))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("imagefolder", "imagenet22k"):
            return convert_command(args)
        if args.command == "verify":
            from data_tools.verify import verify

            return verify(args.out, quick=args.quick, workers=args.workers)
        from data_tools.inspection import inspect

        return inspect(args.out, split=args.split, sheet=args.sheet, samples=args.samples, seed=args.seed,
                       workers=args.workers)
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
