"""The `largessl` command: pretrain, eval knn|linear|attentive|finetune|fewshot, compare, export, bench."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from largessl.commandline import HelpFormatter, Parser, report_failure
from largessl.errors import UserError
from largessl.lifecycle import STOPS


def build_parser() -> Parser:
    parser = Parser(prog="largessl", description="Self-supervised ViT pretraining on DeepSpeed ZeRO.",
                    formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_pretrain(commands)
    add_eval(commands)
    from largessl import export

    export.add_parser(commands)
    from largessl import compare

    compare.add_parser(commands)
    from largessl import bench

    bench.add_parser(commands)
    return parser


def add_pretrain(commands: argparse._SubParsersAction) -> None:
    from largessl.config.load import config_help

    pretrain = commands.add_parser(
        "pretrain", help="pretrain an encoder (resumes the run if it exists)", formatter_class=HelpFormatter,
        description="Pretrain an encoder. Rerunning the same command (same run.output_dir and run.name) resumes\n"
                    "the run from its newest complete checkpoint.", epilog=config_help())
    pretrain.add_argument("--config", required=True, metavar="RECIPE",
                          help="a shipped recipe (listed below) or the path of a YAML file")
    pretrain.add_argument("overrides", nargs="*", metavar="section.key=value",
                          help="config overrides, applied after the recipe")
    pretrain.add_argument("--print-config", action="store_true",
                          help="print the resolved config (every key, with its value) and exit")


def add_eval(commands: argparse._SubParsersAction) -> None:
    from largessl.cpus import default_workers

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint", formatter_class=HelpFormatter)
    protocols = evaluate.add_subparsers(dest="protocol", required=True, parser_class=Parser)
    knn = protocols.add_parser(
        "knn", help="weighted k-NN accuracy of the encoder's [cls] features", formatter_class=HelpFormatter,
        description="Weighted k-NN top-1 of a run's newest complete checkpoint (DINO's protocol; for DINO, of the\n"
                    "teacher). Prints knn_top1 last (knn_top1_mean with --pool mean), writes\n"
                    "RUN_DIR/eval/knn[_mean]_stepNNNNNNNN.json and logs the same metric to the run's MLflow run.")
    from largessl.eval.run import add_fewshot_parser, add_inputs, add_parsers

    add_inputs(knn, checkpoint="run directory (its newest complete checkpoint is used)",
               train="labelled dataset directory: the neighbours", val="labelled dataset directory: the queries")
    knn.add_argument("--step", type=int, default=None, metavar="N",
                     help="evaluate the checkpoint of this step (default: the newest complete one)")
    knn.add_argument("--k", type=int, default=20, metavar="N", help="neighbours that vote")
    knn.add_argument("--temperature", type=float, default=0.07, metavar="T",
                     help="votes are weighted by exp(cosine similarity / temperature)")
    knn.add_argument("--batch-size", type=int, default=128, metavar="N", help="images per feature-extraction batch")
    knn.add_argument("--pool", choices=("cls", "mean"), default="cls",
                     help="image feature: the [cls] output, or the mean patch output (CAE trains no [cls] loss)")
    knn.add_argument("--num-workers", type=int, default=default_workers(), metavar="N",
                     help="DataLoader worker processes (default: the usable CPUs less one, at most 8)")
    knn.add_argument("--baseline", action="store_true",
                     help="also evaluate a random initialisation of the run's model (seeded as the trainer's) on the "
                          "same queries, and say whether the difference is more than noise (exact McNemar test)")
    add_parsers(protocols, HelpFormatter)
    add_fewshot_parser(protocols, HelpFormatter)


def pretrain(args: argparse.Namespace) -> int:
    from largessl.config.load import dump_config, load_config
    from largessl.cpus import announce
    from largessl.lifecycle import die_with_launcher
    from largessl.preflight import check_pretrain

    die_with_launcher()
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    check_pretrain(cfg)  # before torch is imported: a wrong path or batch size is said in a second
    announce(cfg.data.num_workers, "data.num_workers")
    if os.environ.get("RANK", "0") == "0":
        print(f"run {Path(cfg.run.output_dir) / cfg.run.name}: loading PyTorch, DeepSpeed and timm", flush=True)
    from largessl.trainer import train

    return train(cfg)[0]


def eval_knn(args: argparse.Namespace) -> int:
    from largessl.cpus import announce
    from largessl.preflight import check_eval_knn

    if args.k <= 0 or args.temperature <= 0 or args.batch_size <= 0 or args.num_workers < 0:
        raise UserError("--k, --temperature and --batch-size must be > 0, --num-workers >= 0")
    check_eval_knn(args.checkpoint, {"--train": (args.train, args.train_split), "--val": (args.val, args.val_split)},
                   step=args.step)
    announce(args.num_workers, "--num-workers")
    from largessl.eval.standalone import run_knn

    result = run_knn(args.checkpoint, args.train, args.val, step=args.step, train_split=args.train_split,
                     val_split=args.val_split,
                     k=args.k, temperature=args.temperature, batch_size=args.batch_size,
                     num_workers=args.num_workers, pool=args.pool, tracking_uri=args.tracking_uri,
                     baseline=args.baseline)
    print(f"checkpoint {result['checkpoint']} (step {result['step']}): {result['num_train']} neighbours, "
          f"{result['num_val']} queries, k={result['k']}, T={result['temperature']}, {result['pool']} features")
    if result["mlflow_run_id"]:
        print(f"logged knn_top1 to MLflow run {result['mlflow_run_id']}")
    if "baseline_top1" in result:
        print(baseline_line(result))
    print(f"{result['metric']}: {result['knn_top1']:.4f}")
    return 0


def baseline_line(result: dict) -> str:
    """The trained encoder against a random initialisation and chance, with whether the difference is noise."""
    p = result["mcnemar_p"]
    verdict = "within noise (more than noise needs p < 0.05)" if p >= 0.05 else "more than noise (p < 0.05)"
    return (f"baseline: random init {result['baseline_top1']:.4f}, chance {result['chance']:.4f}; on the same "
            f"{result['num_val']} queries {result['only_trained']} right only after training, "
            f"{result['only_baseline']} only at init: exact McNemar p = {p:.2g}: {verdict}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pretrain":
            with STOPS:  # a stop signal in any phase, from here on, ends the job through the trainer's one path
                return pretrain(args)
        if args.command == "compare":
            from largessl import compare

            return compare.run(args)
        if args.command == "export":
            from largessl import export

            return export.run(args)
        if args.command == "bench":
            from largessl import bench

            return bench.run(args)
        if args.protocol == "knn":
            return eval_knn(args)
        from largessl.eval import run as protocol_run

        if args.protocol == "fewshot":
            return protocol_run.run_fewshot_command(args)
        with STOPS:
            return protocol_run.run(args)
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
