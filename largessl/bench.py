"""`largessl bench`: the speed of a recipe's real objective, engine and input pipeline, measured.

    largessl bench --config RECIPE [key=value ...] [--steps N] [--warmup N] [--synthetic | --data-only] [--json FILE]

The trainer is built as for `pretrain` (DeepSpeed, ZeRO, precision, the objective, the DataLoader) on a throwaway run
directory with tracking, checkpoints and evaluation off; `--warmup` optimizer steps run untimed, then `--steps` are
timed one by one, the device synchronised at each step's end, with the time spent waiting for the next batch kept
apart from the rest. `--synthetic` takes one real batch, keeps it on the device and feeds it again every step: the
compute ceiling, with no input pipeline. `--data-only` builds no model: the input pipeline alone at the configured
workers, batches taken as fast as it makes them. It prints images/s, TFLOP/s and MFU (from the FLOP model and the
device's peak, mfu.py), peak memory and the data/compute split, and last one JSON line (also to --json FILE).
Under torchrun every rank runs it and rank 0 reports; images/s count all ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from largessl.errors import UserError


def add_parser(commands: argparse._SubParsersAction) -> None:
    from largessl.commandline import HelpFormatter

    bench = commands.add_parser(
        "bench", help="measure a recipe's images/s, TFLOP/s, MFU and memory", formatter_class=HelpFormatter,
        description=__doc__.split("\n\n", 2)[2].strip())
    bench.add_argument("--config", required=True, metavar="RECIPE", help="a shipped recipe or a YAML file")
    bench.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    bench.add_argument("--steps", type=int, default=20, metavar="N", help="timed optimizer steps (or batches)")
    bench.add_argument("--warmup", type=int, default=5, metavar="N", help="untimed steps before them")
    mode = bench.add_mutually_exclusive_group()
    mode.add_argument("--synthetic", action="store_true", help="feed one batch kept on the device: no input pipeline")
    mode.add_argument("--data-only", action="store_true", help="the input pipeline alone, no model")
    bench.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the JSON line here")


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    cfg = bench_config(args)
    from largessl.cpus import announce
    from largessl.preflight import check_pretrain

    check_pretrain(cfg)
    announce(cfg.data.num_workers, "data.num_workers")
    with tempfile.TemporaryDirectory(prefix="largessl-bench-") as scratch:
        from dataclasses import replace

        cfg = replace(cfg, run=replace(cfg.run, output_dir=scratch))
        result = data_only(cfg, args) if args.data_only else model_bench(cfg, args)
    if result is None:  # not rank 0
        return 0
    say_result(result)
    line = json.dumps(result, sort_keys=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(line + "\n")
    print(line, flush=True)
    return 0


def bench_config(args: argparse.Namespace) -> Any:
    """The recipe with tracking, checkpoints and evaluation off and just enough steps; the run directory is set
    to a scratch one by the caller."""
    from largessl.config.load import load_config

    steps = args.warmup + args.steps
    forced = [f"trainer.max_steps={steps}", "trainer.epochs=null", f"trainer.ckpt_every={steps + 1}",
              "trainer.ckpt_every_minutes=0", f"trainer.log_every={steps + 1}", "optim.warmup_steps=0",
              "optim.warmup_epochs=null", "tracking.enabled=false", "eval.knn_every=0", "run.name=bench"]
    return load_config(args.config, [*args.overrides, *forced])


# ----------------------------------------------------------------------------- the model


def model_bench(cfg: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    """Warm-up, then the timed steps of the real trainer; the result on rank 0."""
    from largessl.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        feed = TimedFeed(trainer.batches, trainer.env.device, synthetic=args.synthetic)
        for _ in range(args.warmup):
            trainer.train_step(feed, want_norm=False)
            trainer.step += 1
        return timed_steps(trainer, feed, args)
    finally:
        trainer.close("FINISHED")


def timed_steps(trainer: Any, feed: TimedFeed, args: argparse.Namespace) -> dict[str, Any] | None:
    import torch

    from largessl.progress import peak_memory_gb, sync

    device = trainer.env.device
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    feed.waited, wall = 0.0, 0.0
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.train_step(feed, want_norm=False)
        trainer.step += 1
        sync(device)
        wall += time.perf_counter() - start
    if not trainer.env.is_main:
        return None
    cfg = trainer.cfg
    step_time = wall / args.steps
    images_per_sec = cfg.optim.global_batch_size / step_time
    speed = trainer.speed.metrics(images_per_sec)
    return {**describe(cfg, args, device, trainer.env.world_size), "images_per_sec": images_per_sec,
            "step_time_s": step_time, "data_wait_s_per_step": feed.waited / args.steps,
            "compute_s_per_step": step_time - feed.waited / args.steps,
            "data_wait_fraction": feed.waited / wall, "peak_mem_gb": peak_memory_gb(device),
            "flops_per_image": trainer.speed.flops_per_image, "peak_tflops": trainer.speed.peak,
            "tflops_per_gpu": speed.get("tflops_per_gpu"), "mfu": speed.get("mfu"),
            "global_batch": cfg.optim.global_batch_size, "micro_batch": cfg.data.micro_batch_size,
            "attention_kernel": attention_kernel(cfg, device)}


class TimedFeed:
    """The trainer's batches, with the time spent waiting for each; with `synthetic`, the first batch again and
    again, already on the device."""

    def __init__(self, batches: Iterator[dict], device: Any, *, synthetic: bool) -> None:
        self.batches, self.waited = batches, 0.0
        self.kept = None
        if synthetic:
            first = next(batches)
            self.kept = {k: (v if k.startswith("_") else v.to(device)) for k, v in first.items()}

    def __iter__(self) -> TimedFeed:
        return self

    def __next__(self) -> dict:
        if self.kept is not None:
            return dict(self.kept)  # the trainer pops the bookkeeping keys off each batch it takes
        start = time.perf_counter()
        batch = next(self.batches)
        self.waited += time.perf_counter() - start
        return batch


# ----------------------------------------------------------------------------- the input pipeline alone


def data_only(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Batches from the configured pipeline (one process, this rank's share), as fast as it makes them."""
    import torch

    from largessl.data.build import build_train_loader, plan_training
    from largessl.data.gpu_decode import to_device
    from largessl.data.index import open_split
    from largessl.data.loader import kill_workers
    from largessl.objectives import objective_class
    from largessl.progress import sync

    index = open_split(cfg.data.train, cfg.data.train_split, "data.train")
    plan = plan_training(cfg.data, index, seed=cfg.trainer.seed, world_size=1, global_batch=cfg.data.micro_batch_size)
    method = objective_class(cfg.objective.name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # with data.decode=gpu the workers' half and the device half (decode, crop, resize) both count
    transform, stage = method.input_transforms(cfg.objective, cfg.model, cfg.data.decode)
    batches = iter(build_train_loader(cfg.data, plan, transform, rank=0, world_size=1))

    def take() -> None:
        batch = next(batches)
        if stage is not None:
            to_device(batch, device, stage)
            sync(device)

    try:
        for _ in range(args.warmup):
            take()
        start = time.perf_counter()
        for _ in range(args.steps):
            take()
        wall = time.perf_counter() - start
    finally:
        kill_workers()
    return {**describe(cfg, args, device if stage is not None else torch.device("cpu"), 1),
            "images_per_sec": cfg.data.micro_batch_size * args.steps / wall, "batch_s": wall / args.steps,
            "micro_batch": cfg.data.micro_batch_size, "num_workers": cfg.data.num_workers, "decode": cfg.data.decode}


# ----------------------------------------------------------------------------- the report


def describe(cfg: Any, args: argparse.Namespace, device: Any, world_size: int) -> dict[str, Any]:
    import torch

    from largessl.tracking import git_commit

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    mode = "data-only" if args.data_only else "synthetic" if args.synthetic else "end-to-end"
    return {"recipe": args.config, "overrides": list(args.overrides), "method": cfg.objective.name,
            "model": cfg.model.name, "image_size": cfg.model.image_size, "mode": mode, "steps": args.steps,
            "warmup": args.warmup, "world_size": world_size, "device": name, "precision": cfg.distributed.precision,
            "zero_stage": cfg.distributed.zero_stage, "git_commit": git_commit()}


def attention_kernel(cfg: Any, device: Any) -> str | None:
    """The fused attention kernel PyTorch's dispatcher takes for the encoder's self-attention at its token count,
    heads and compute dtype: the first of flash, memory-efficient, math (its order of preference) that runs alone;
    None on CPU."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda":
        return None
    dim, _, heads = cfg.model.dims
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.distributed.precision, torch.float32)
    q = torch.randn(2, heads, cfg.model.num_patches + 1, dim // heads, device=device, dtype=dtype)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("math", SDPBackend.MATH)):
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            return name
        except RuntimeError:
            continue
    return None


def say_result(result: dict[str, Any]) -> None:
    head = (f"bench {result['recipe']} ({result['method']}, {result['model']} at {result['image_size']} px, "
            f"{result['mode']}, {result['steps']} steps after {result['warmup']}) on {result['world_size']} x "
            f"{result['device']}")
    print(head, flush=True)
    if result["mode"] == "data-only":
        print(f"  input pipeline: {result['images_per_sec']:.1f} images/s at {result['num_workers']} worker(s), "
              f"{1000 * result['batch_s']:.1f} ms per batch of {result['micro_batch']}", flush=True)
        return
    mfu = f", {100 * result['mfu']:.1f}% MFU of {result['peak_tflops']:g}" if result["mfu"] is not None else ""
    tflops = f"{result['tflops_per_gpu']:.3g} TFLOP/s per device{mfu}" if result["tflops_per_gpu"] is not None else ""
    kernel = f"; attention: {result['attention_kernel']}" if result["attention_kernel"] else ""
    print(f"  {result['images_per_sec']:.1f} images/s, {tflops}; peak memory {result['peak_mem_gb']:.2f} GB{kernel}",
          flush=True)
    wait = 1000 * result["data_wait_s_per_step"]
    print(f"  per step {1000 * result['step_time_s']:.1f} ms: waiting for data {wait:.1f} ms "
          f"({100 * result['data_wait_fraction']:.0f}%), the rest {1000 * result['compute_s_per_step']:.1f} ms",
          flush=True)
