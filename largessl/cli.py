"""The `largessl` command: pretrain, eval knn."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from largessl.errors import UserError, is_lost_peer, one_line


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit code 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> Parser:
    parser = Parser(prog="largessl", description="Self-supervised ViT pretraining on DeepSpeed ZeRO.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    pretrain = commands.add_parser("pretrain", help="pretrain an encoder (resumes the run if it exists)")
    pretrain.add_argument("--config", required=True, help="shipped recipe name (e.g. debug/mae_vit_tiny) or YAML path")
    pretrain.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    pretrain.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint")
    protocols = evaluate.add_subparsers(dest="protocol", required=True, parser_class=Parser)
    knn = protocols.add_parser("knn", help="weighted k-NN accuracy of the encoder's [cls] features")
    knn.add_argument("--checkpoint", required=True, type=Path, help="run directory (its latest checkpoint is used)")
    knn.add_argument("--train", required=True, help="labelled dataset directory: the neighbours")
    knn.add_argument("--val", required=True, help="labelled dataset directory: the queries")
    knn.add_argument("--train-split", default="train")
    knn.add_argument("--val-split", default="val")
    knn.add_argument("--k", type=int, default=20)
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument("--batch-size", type=int, default=128)
    knn.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    return parser


def pretrain(args: argparse.Namespace) -> int:
    from largessl.config.load import dump_config, load_config
    from largessl.lifecycle import die_with_launcher

    die_with_launcher()
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from largessl.trainer import Trainer

    return Trainer(cfg).train()


def eval_knn(args: argparse.Namespace) -> int:
    from largessl.eval.standalone import run_knn

    if args.k <= 0 or args.temperature <= 0 or args.batch_size <= 0:
        raise UserError("--k, --temperature and --batch-size must be > 0")
    result = run_knn(args.checkpoint, args.train, args.val, train_split=args.train_split, val_split=args.val_split,
                     k=args.k, temperature=args.temperature, batch_size=args.batch_size,
                     num_workers=args.num_workers)
    print(f"checkpoint {result['checkpoint']} (step {result['step']}): {result['num_train']} neighbours, "
          f"{result['num_val']} queries, k={result['k']}, T={result['temperature']}")
    if result["mlflow_run_id"]:
        print(f"logged knn_top1 to MLflow run {result['mlflow_run_id']}")
    print(f"knn_top1: {result['knn_top1']:.4f}")
    return 0


def rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1)
    return f"[rank {os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0'))}] " if world > 1 else ""


def report_failure(exc: BaseException) -> int:
    """One line on stderr for any exception, and the exit code: 2 for what the user must fix, 1 otherwise (with
    the traceback above the line, when it is a bug rather than a failed disk, file or peer)."""
    from largessl.errors import SharedError

    if isinstance(exc, SharedError):  # the same on every rank: rank 0 says it
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"largessl: error: {one_line(exc)}", file=sys.stderr)
        return 2
    if isinstance(exc, UserError):
        print(f"largessl: error: {rank_prefix()}{one_line(exc)}", file=sys.stderr)
        return 2
    if isinstance(exc, OSError):
        print(f"largessl: error: {rank_prefix()}{exc}", file=sys.stderr)
        return 2
    if is_lost_peer(exc):
        print(f"largessl: error: {rank_prefix()}lost contact with another rank, which probably failed (its error "
              f"is above): {one_line(exc)[:300]}", file=sys.stderr)
        return 1
    traceback.print_exception(exc)
    print(f"largessl: error: {rank_prefix()}{type(exc).__name__}: {one_line(exc)} (a bug: the traceback is above)",
          file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pretrain":
            return pretrain(args)
        return eval_knn(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return report_failure(exc)


def entry() -> None:
    code = main()
    if code == 0:
        sys.exit(0)
    # After a failure nothing may keep the process alive (a thread, a collective, a backend's destructor): the
    # job has already released what it held (Trainer.close), so leave without the interpreter's exit handlers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
