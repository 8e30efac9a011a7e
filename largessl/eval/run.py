"""`largessl eval linear|attentive|finetune`: an evaluation protocol, run by the pretraining trainer.

The command builds the protocol's config: the shipped recipe (configs/eval/) or --config, with the model section
of the pretraining run (drop path 0 unless the recipe sets it), the run's checkpoint as the starting encoder, the
classes of the train split, and a run directory RUN_DIR/eval/PROTOCOL_stepNNNNNNNN of its own (rerunning the
command resumes it). It trains, then writes RUN_DIR/eval/PROTOCOL_stepNNNNNNNN.json, logs PROTOCOL_top1 onto the
pretraining run's MLflow run (the evaluation has its own run too, tagged with the pretraining run's id) and prints
`PROTOCOL_top1: 0.xxxx` last.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from largessl.config.load import config_from_tree, find_recipe, list_recipes, recipe_summary
from largessl.config.loader import read_yaml, to_dict
from largessl.config.schema import PretrainConfig
from largessl.cpus import announce, default_workers
from largessl.data.index import open_split
from largessl.distributed.env import read_env
from largessl.errors import UserError
from largessl.eval.fit import fit
from largessl.eval.labels import check as check_labels
from largessl.eval.protocol_config import METRICS, PROTOCOL_CONFIGS
from largessl.eval.source import open_pretrained

ARCH = {"vit_base_patch16": "vitb16", "vit_large_patch16": "vitl16", "vit_huge_patch14": "vith14"}
SMALLER = ("vit_tiny_patch16", "vit_small_patch16", "vit_tiny_patch14", "vit_small_patch14")
HELP = {"linear": "linear probe on frozen features (MAE/CAE/SIM: BN + Linear, LARS; DINO: last-4 [cls], SGD)",
        "attentive": "CAE's attentive probe: one query token cross-attends the frozen tokens, BN, Linear",
        "finetune": "fine-tune the whole encoder (layer decay, drop path, mixup/cutmix, RandAugment)"}


def add_inputs(parser: argparse.ArgumentParser, *, checkpoint: str, train: str, val: str) -> None:
    """The arguments every `largessl eval` command takes: the run directory and the two labelled splits."""
    parser.add_argument("--checkpoint", required=True, type=Path, metavar="RUN_DIR|EXPORT",
                        help=f"{checkpoint}; or a file (or --format timm directory) that `largessl export` wrote")
    parser.add_argument("--train", required=True, metavar="DATASET", help=train)
    parser.add_argument("--val", required=True, metavar="DATASET", help=val)
    parser.add_argument("--train-split", default="train", metavar="SPLIT", help="split of --train")
    parser.add_argument("--val-split", default="val", metavar="SPLIT", help="split of --val")
    parser.add_argument("--tracking-uri", default="", metavar="URI",
                        help="MLflow store holding the pretraining run, to log the result onto (default: the one a "
                             "run directory logged to; for an export, $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
                             "here: never a store an export's metadata names)")


def add_parsers(protocols: argparse._SubParsersAction, formatter: type) -> None:
    recipes = "\n".join(f"  {name:<30}{recipe_summary(name)}" for name in list_recipes("eval"))
    for protocol in PROTOCOL_CONFIGS:
        parser = protocols.add_parser(
            protocol, help=HELP[protocol], formatter_class=formatter,
            description=f"{HELP[protocol]}.\nRuns through the pretraining trainer (DeepSpeed, resume, MLflow): rerun "
                        f"the same command to resume.\nPrints {METRICS[protocol]} last and writes "
                        f"RUN_DIR/eval/{protocol}_stepNNNNNNNN.json.",
            epilog=f"shipped evaluation recipes (--config NAME; the default is chosen by method and model):\n{recipes}"
                   f"\n\n{protocol_keys(protocol)}")
        add_inputs(parser, checkpoint="pretraining run directory (its newest complete checkpoint, or --step)",
                   train="labelled dataset directory to train on", val="labelled dataset directory for top-1")
        parser.add_argument("--step", type=int, default=None, metavar="N", help="evaluate the checkpoint of this step")
        parser.add_argument("--config", default="", metavar="RECIPE",
                            help="an evaluation recipe or YAML file (default: the method's and model's own)")
        parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
        parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def protocol_keys(protocol: str) -> str:
    """The protocol's own keys and the sections it shares with pretraining, for its --help."""
    import dataclasses
    import textwrap

    keys = ", ".join(f.name for f in dataclasses.fields(PROTOCOL_CONFIGS[protocol]) if f.name != "name")
    return ("config keys (section.key=value after the options; --print-config shows every value):\n"
            + textwrap.fill(f"objective: {keys}", 118, initial_indent="  ", subsequent_indent="    ")
            + "\n  model, data, optim, trainer, distributed, run, tracking, eval: as for pretraining "
            "(largessl pretrain --help)")


def default_recipe(protocol: str, run_cfg: PretrainConfig) -> tuple[str, str]:
    """The shipped recipe of a protocol for the run's method and model (configs/eval/), and what is said of a
    stand-in: a model smaller than ViT-B (the demo's ViT-Tiny) is fine-tuned with the ViT-B/16 recipe."""
    method = run_cfg.objective.name
    if protocol == "linear":
        return ("eval/linear_dino" if method == "dino" else "eval/linear"), ""
    if protocol == "attentive":
        return "eval/attentive", ""
    arch = ARCH.get(run_cfg.model.name, "")
    shipped = list_recipes("eval")
    for name in (f"eval/finetune_{method}_{arch}", f"eval/finetune_{arch}"):
        if arch and name in shipped:
            return name, ""
    if run_cfg.model.name in SMALLER:
        return "eval/finetune_vitb16", (f"finetune: no recipe for {run_cfg.model.name}; using eval/finetune_vitb16, "
                                        "MAE's ViT-B/16 recipe (--config to choose another)")
    raise UserError(f"finetune: no shipped fine-tuning recipe for a {method} {run_cfg.model.name} run; pass "
                    f"--config (shipped: {', '.join(n for n in shipped if 'finetune' in n)})")


def build_config(args: argparse.Namespace) -> tuple[PretrainConfig, PretrainConfig, int, list[str]]:
    """(the evaluation's config fitted to this job (eval/fit.py), the pretraining run's config, the evaluated step,
    the lines to say: the two splits' labels (eval/labels.py) and each fitted key); errors before torch loads."""
    pretrained = open_pretrained(args.checkpoint, args.step)
    run_cfg, step = pretrained.config, pretrained.step
    if run_cfg.objective.name in PROTOCOL_CONFIGS:
        raise UserError(f"--checkpoint: {args.checkpoint} is an evaluation run; give the pretraining run directory")
    train = open_split(args.train, args.train_split, "--train")
    labels = check_labels(train, open_split(args.val, args.val_split, "--val"), ("--train", "--val"))  # or refused
    default, stand_in = ("", "") if args.config else default_recipe(args.protocol, run_cfg)
    recipe = find_recipe(args.config or default, kind="eval")
    base = read_yaml(recipe)
    classes = train.classes
    if len(classes) < 2:
        raise UserError(f"--train: {args.train} lists {len(classes)} classes in its dataset.json; an evaluation needs "
                        "labelled data (python -m data_tools imagefolder writes the class list)")
    objective = base.setdefault("objective", {})
    if objective.get("name", args.protocol) != args.protocol:
        raise UserError(f"--config: {recipe} is a recipe for objective {objective['name']}, not {args.protocol}")
    objective.update(name=args.protocol, checkpoint=str(args.checkpoint), checkpoint_step=step,
                     num_classes=len(classes))
    base["model"] = {**to_dict(run_cfg.model), "drop_path_rate": 0.0, **(base.get("model") or {})}
    base.setdefault("data", {}).update(train=args.train, train_split=args.train_split, val=args.val,
                                       val_split=args.val_split)
    base.setdefault("run", {}).update(output_dir=str(pretrained.eval_dir), name=f"{args.protocol}_step{step:08d}")
    # its own experiment beside the pretraining one, so `largessl compare` lists pretraining runs only
    tracking = pretrained.tracking(args.tracking_uri)
    run_tracking = {"uri": tracking.uri, "experiment": f"{tracking.experiment}-eval", "enabled": tracking.enabled}
    base["tracking"] = {**run_tracking, **(base.get("tracking") or {})}
    cfg, fitted = fit(config_from_tree(base, args.overrides, default_name=args.protocol), train.num_samples,
                      read_env()[1], args.overrides)
    return cfg, run_cfg, step, [line for line in (stand_in, labels, *fitted) if line]


def run(args: argparse.Namespace) -> int:
    from largessl.lifecycle import die_with_launcher
    from largessl.preflight import check_pretrain

    die_with_launcher()
    cfg, run_cfg, step, notes = build_config(args)
    if args.print_config:
        from largessl.config.load import dump_config

        print(dump_config(cfg), end="")
        return 0
    check_pretrain(cfg)
    announce(cfg.data.num_workers, "data.num_workers")
    main = os.environ.get("RANK", "0") == "0"
    if main:
        for line in notes:
            print(line, flush=True)
        where = Path(cfg.run.output_dir) / cfg.run.name
        print(f"{args.protocol} evaluation of {args.checkpoint} (step {step}) in {where}: loading PyTorch, DeepSpeed "
              "and timm", flush=True)
    from largessl.trainer import train

    code, trainer = train(cfg)
    if code or not main:
        return code
    return report(args, cfg, run_cfg, step, trainer)


def report(args: argparse.Namespace, cfg: PretrainConfig, run_cfg: PretrainConfig, step: int, trainer: Any) -> int:
    """The result file, the metric on the pretraining run, the last line."""
    pretrained = open_pretrained(args.checkpoint, step)
    metric, top1 = METRICS[args.protocol], float(trainer.evals.top1)
    result = {metric: top1, "metric": metric, "protocol": args.protocol, "step": step,
              "checkpoint": str(pretrained.checkpoint), "eval_run_dir": str(trainer.run_dir),
              "eval_steps": trainer.step, "train": args.train, "train_split": args.train_split, "val": args.val,
              "val_split": args.val_split, "recipe": args.config or default_recipe(args.protocol, run_cfg)[0],
              "overrides": list(args.overrides), "mlflow_run_id": trainer.tracker.run_id}
    out = pretrained.eval_dir / f"{args.protocol}_step{step:08d}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    logged = pretrained.log_to_run({metric: top1}, args.tracking_uri)
    print(f"wrote {out}" + (f"; logged {metric} to the pretraining run's MLflow run {logged}" if logged else ""))
    print(f"{metric}: {top1:.4f}")
    return 0


def add_fewshot_parser(protocols: argparse._SubParsersAction, formatter: type) -> None:
    """`largessl eval fewshot`: not a trainer objective (its reference caches features and fits once)."""
    parser = protocols.add_parser(
        "fewshot", help="SIM's 1%% few-shot protocol: logistic regression on frozen features of 1%% of the labels",
        formatter_class=formatter,
        description="Few-shot top-1 of a run's checkpoint (SIM's main_logistic.py): a deterministic per-class subset\n"
                    "of the train split, frozen features (cached in RUN_DIR/eval), a multinomial logistic regression\n"
                    "with an L2 penalty fitted to convergence. Prints fewshot_top1 last, writes\n"
                    "RUN_DIR/eval/fewshot_stepNNNNNNNN.json and logs fewshot_top1 to the run's MLflow run.")
    add_inputs(parser, checkpoint="pretraining run directory", train="labelled dataset: the subset's source",
               val="labelled dataset: the queries")
    parser.add_argument("--step", type=int, default=None, metavar="N", help="evaluate the checkpoint of this step")
    parser.add_argument("--percent", type=float, default=None, metavar="P",
                        help="labelled share per class, in %% (default 1)")
    parser.add_argument("--subset", type=Path, default=None, metavar="FILE",
                        help="instead of --percent: the labelled images, one file name per line, matched to the "
                             "shards' source names (SIM's imagenet_subset1/1percent.txt)")
    parser.add_argument("--lambd", type=float, default=0.1, metavar="L",
                        help="L2 penalty before division by the subset size (SIM: 0.1 for ViT-B, 0.01 for ViT-L)")
    parser.add_argument("--pool", choices=("cls", "mean"), default="cls",
                        help="feature: the [cls] output (SIM's), or the mean patch output")
    parser.add_argument("--batch-size", type=int, default=128, metavar="N", help="images per feature batch")
    parser.add_argument("--num-workers", type=int, default=default_workers(), metavar="N",
                        help="DataLoader workers for the val split (default: the usable CPUs less one, at most 8)")


def run_fewshot_command(args: argparse.Namespace) -> int:
    """`largessl eval fewshot` (eval/fewshot.py): checks before torch loads, then the protocol, the last line."""
    from largessl.eval.fewshot import read_subset_file, run_fewshot, subset_tag


    if args.subset is not None and args.percent is not None:
        raise UserError("--subset and --percent: give one (the subset file lists the labelled images itself)")
    percent = 1.0 if args.percent is None else args.percent
    if not 0 < percent <= 100 or args.lambd < 0 or args.batch_size <= 0 or args.num_workers < 0:
        raise UserError("--percent must be in (0, 100], --lambd >= 0, --batch-size > 0, --num-workers >= 0")
    open_pretrained(args.checkpoint, args.step)  # a wrong path or step is said before torch loads
    train = open_split(args.train, args.train_split, "--train")
    val = open_split(args.val, args.val_split, "--val")
    note = check_labels(train, val, ("--train", "--val"))
    if note:
        print(note, flush=True)
    names = read_subset_file(args.subset) if args.subset else None
    tag = subset_tag(args.subset, names) if names else ""
    announce(args.num_workers, "--num-workers")
    result = run_fewshot(args.checkpoint, args.step, train, val, percent=percent, lambd=args.lambd, pool=args.pool,
                         batch_size=args.batch_size, num_workers=args.num_workers, names=names, subset_tag=tag,
                         tracking_uri=args.tracking_uri)
    share = f"the {len(names)} of {args.subset}" if names else f"{percent:g}% per class"
    print(f"checkpoint {result['checkpoint']} (step {result['step']}): {result['num_train']} labelled images "
          f"({share}), {result['num_val']} queries, {args.pool} features, lambda {args.lambd}; "
          f"L-BFGS {result['lbfgs_iterations']} iterations")
    if result["mlflow_run_id"]:
        print(f"logged fewshot_top1 to MLflow run {result['mlflow_run_id']}")
    print(f"fewshot_top1: {result['fewshot_top1']:.4f}")
    return 0
