"""python -m data_tools {imagefolder,imagenet22k,verify,inspect}: write, check and look at shard datasets.

Argument errors are reported before anything heavy is imported (torch, torchvision, webdataset, worker pools):
this module imports only the standard library and two small data_tools modules, and each command imports its
implementation only once its arguments have been checked.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

from data_tools.errors import PROG, ToolError
from data_tools.limits import DEFAULT_MAX_GUNZIP_BYTES, DEFAULT_MAX_PIXELS, GUNZIP_MAX_RATIO


class Formatter(argparse.HelpFormatter):
    """Help lines wrapped between words only (an option such as --shard-bytes is never split at its hyphen)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=26)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit code 2) instead of usage + error, like largessl's.

    Every error line of this tool starts `python -m data_tools: error:`, a subcommand's too; the hint names the
    --help of the (sub)command whose arguments were wrong."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str, help_of: str | None = None) -> None:  # type: ignore[override]
        print(f"{PROG}: error: {message} (see {help_of or self.prog} --help)", file=sys.stderr)
        sys.exit(2)

    def parse_args(self, args: list[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        """argparse's, except that an unknown option after a subcommand points to that subcommand's --help."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(namespace, "command", None)
            self.error(f"unrecognized arguments: {' '.join(extras)}", f"{self.prog} {command}" if command else None)
        return namespace


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def quality(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to 100, got {text!r}")
    return value


def size_in_bytes(text: str) -> int:
    """`1GB`, `500MB`, `1GiB`, `1073741824`."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12}
    upper = text.strip().upper()
    try:
        for unit, factor in units.items():
            if upper.endswith(unit):
                value = int(float(upper[: -len(unit)]) * factor)
                break
        else:
            value = int(upper)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"must be a size such as 500MB, 1GiB or a number of bytes, got "
                                         f"{text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_convert_options(parser: argparse.ArgumentParser) -> None:
    sizing = parser.add_mutually_exclusive_group()
    sizing.add_argument("--shard-bytes", type=size_in_bytes, default=2**30, metavar="SIZE",
                        help="target shard size, e.g. 1GB, 500MB or a number of bytes; the shards of a split hold "
                             "equal sample counts (within one), planned from the mean stored image size "
                             "(default: 1GiB)")
    sizing.add_argument("--samples-per-shard", type=positive, metavar="N",
                        help="exactly N samples per shard instead, the last shard of a split holding the rest; a "
                             "shard holds fewer when some of its images are rejected (default: off, --shard-bytes "
                             "decides)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of the global shuffle (default: 0)")
    parser.add_argument("--max-size", type=positive, metavar="N",
                        help="shrink so the short side is at most N pixels, never enlarging (default: keep the "
                             "size)")
    parser.add_argument("--quality", type=quality, default=90, metavar="1-100",
                        help="JPEG quality of converted images; RGB JPEGs within --max-size are copied byte for "
                             "byte (default: 90)")
    parser.add_argument("--workers", type=positive, default=default_workers(), metavar="N",
                        help=f"worker processes (default: all cores, {default_workers()} here)")
    parser.add_argument("--max-reject-fraction", type=float, default=0.01, metavar="F",
                        help="exit 1 when more than this fraction of the inputs is rejected; the dataset is still "
                             "written (default: 0.01)")
    parser.add_argument("--expect-classes", type=positive, metavar="N",
                        help="stop before writing anything unless there are exactly N classes (ImageNet-1K: 1000; "
                             "ImageNet-22K winter21: 19167, fall11: 21841) (default: no check)")
    parser.add_argument("--max-pixels", type=positive, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="reject an image with more pixels than this, read from its header before decoding; "
                             "for a JPEG shrunk by --max-size, the pixels of its reduced draft-mode decode "
                             f"(default: {DEFAULT_MAX_PIXELS:,})")
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


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Write, check and look at largessl shard datasets (docs/data.md).",
                    epilog=f"Each command's options and their defaults: {PROG} COMMAND --help")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (add_imagefolder, add_imagenet22k, add_verify, add_inspect):
        add(commands)
    return parser


def add_imagefolder(commands: argparse._SubParsersAction) -> None:
    folder = commands.add_parser("imagefolder", help="class-folder tree -> one split of a shard dataset",
                                 description="A class-folder tree (ImageNet-1K train/ or val/, Imagenette) -> one "
                                             "split of a shard dataset; run it again to resume.")
    folder.add_argument("src", type=Path, metavar="SRC", help="folder with one sub-folder of images per class")
    folder.add_argument("out", type=Path, metavar="OUT", help="dataset directory (created; other splits are kept)")
    folder.add_argument("--split", default="train", metavar="NAME",
                        help="split name: letters, digits or _ (default: train)")
    add_convert_options(folder)


def add_imagenet22k(commands: argparse._SubParsersAction) -> None:
    in22k = commands.add_parser("imagenet22k", help="ImageNet-22K release -> train (and val) splits",
                                description="The ImageNet-22K release -> split train (and, with --val-per-class, "
                                            "val); run it again to resume.")
    in22k.add_argument("src", type=Path, metavar="SRC",
                       help="fall11_whole.tar / winter21_whole.tar, a directory of per-synset tars, or a directory "
                            "of synset folders")
    in22k.add_argument("out", type=Path, metavar="OUT", help="dataset directory (created)")
    in22k.add_argument("--classes", type=Path, metavar="FILE",
                       help="file with one wnid per line: the classes and their order (default: the sorted wnids "
                            "found)")
    in22k.add_argument("--val-per-class", type=int, default=0, metavar="N",
                       help="hold out N images per class as split 'val' (seeded; at most half a class) "
                            "(default: 0, no val split)")
    in22k.add_argument("--max-gunzip-bytes", type=size_in_bytes, default=DEFAULT_MAX_GUNZIP_BYTES, metavar="SIZE",
                       help=f"reject a gzip-compressed synset tar that decompresses to more than this or to more "
                            f"than {GUNZIP_MAX_RATIO}x its compressed size "
                            f"(default: {DEFAULT_MAX_GUNZIP_BYTES >> 30}GiB)")
    add_convert_options(in22k)


def add_verify(commands: argparse._SubParsersAction) -> None:
    verify = commands.add_parser("verify", help="check every shard against dataset.json",
                                 description="Check every shard against dataset.json; exit 0 OK, 1 FAILED.")
    verify.add_argument("out", type=Path, metavar="OUT", help="dataset directory")
    verify.add_argument("--quick", action="store_true",
                        help="sizes and sample counts only, no hashing or decoding (default: full check)")
    verify.add_argument("--workers", type=positive, default=default_workers(), metavar="N",
                        help=f"worker processes (default: all cores, {default_workers()} here)")


def add_inspect(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser("inspect", help="class histogram, shard sizes and a contact sheet",
                                  description="Class histogram, shard-size statistics and a contact sheet of "
                                              "random samples.")
    inspect.add_argument("out", type=Path, metavar="OUT", help="dataset directory")
    inspect.add_argument("--split", metavar="NAME", help="only this split (default: all splits)")
    inspect.add_argument("--sheet", type=Path, metavar="PNG", help="contact-sheet path (default: "
                                                                   "./NAME_contact_sheet.png, NAME the dataset "
                                                                   "directory's; the dataset is left as it is)")
    inspect.add_argument("--samples", type=positive, default=48, metavar="N",
                         help="images on the contact sheet (default: 48)")
    inspect.add_argument("--seed", type=int, default=0, metavar="N",
                         help="seed of the draw of contact-sheet images (default: 0)")
    inspect.add_argument("--workers", type=positive, default=default_workers(), metavar="N",
                         help=f"worker processes (default: all cores, {default_workers()} here)")


def convert_command(args: argparse.Namespace) -> int:
    """Checks the arguments, then imports the converter (it pulls in PIL; its pool, torch)."""
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

    from data_tools.conversion import Conversion, Options
    from data_tools.convert import run

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
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
