"""The official MAE code and ours, timed on the same device, model, batch and precision in one run.

    python benchmarks/mae_side_by_side.py --mae-repo PATH/TO/facebookresearch/mae [--model base|large|huge]
        [--batch 256] [--steps 20] [--warmup 5] [--precision bf16|fp16] [--json FILE] [largessl key=value ...]

The user supplies a checkout of facebookresearch/mae (it is never copied into this repository). Both sides train on
the same synthetic batch kept on the device (no input pipeline), mask ratio 0.75, normalised-pixel loss:

- official: `models_mae.mae_vit_{model}_patch{16,14}_dec512d8b(norm_pix_loss=True)`, torch.optim.AdamW (lr 1.5e-4,
  betas 0.9/0.95, wd 0.05) and the step of its engine_pretrain.py: autocast (fp16 with a GradScaler, as released,
  or bf16 without), backward, optimizer step. Two shims let the 2021 code import under today's libraries, and change
  nothing it computes: timm's Block no longer takes `qk_scale` (the code passes None, the default), and NumPy
  dropped `np.float` (its sin-cos table uses it; float64 as before).
- ours: `largessl bench --synthetic` of the recipe pretrain/mae_vit{b16,l16,h14} at the same micro-batch and
  precision (DeepSpeed, our defaults), in this process.

Prints both images/s, their ratio (ours / official) and one JSON line. Meant for a GPU; on CPU it runs, slowly.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import timm.models.vision_transformer as timm_vit
import torch

SIZES = {"base": ("mae_vit_base_patch16_dec512d8b", "pretrain/mae_vitb16", 224),
         "large": ("mae_vit_large_patch16_dec512d8b", "pretrain/mae_vitl16", 224),
         "huge": ("mae_vit_huge_patch14_dec512d8b", "pretrain/mae_vith14", 224)}


class BlockWithQkScale(timm_vit.Block):
    """timm's Block, accepting the `qk_scale=None` the official code passes (timm 0.3.2 had it; None was the
    default there, the 1/sqrt(head dim) scale timm uses today)."""

    def __init__(self, *args: object, qk_scale: float | None = None, **kwargs: object) -> None:
        if qk_scale is not None:
            raise ValueError("only qk_scale=None (the official code's value) is supported")
        super().__init__(*args, **kwargs)


def official_model(repo: Path, name: str) -> torch.nn.Module:
    if not hasattr(np, "float"):
        np.float = float  # type: ignore[attr-defined]  # util/pos_embed.py's dtype=np.float: float64
    timm_vit.Block = BlockWithQkScale  # models_mae imports the name at import time
    sys.path.insert(0, str(repo))
    models_mae = importlib.import_module("models_mae")
    return getattr(models_mae, name)(norm_pix_loss=True)


def time_official(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> float:
    """images/s of the official training step on one synthetic batch."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    fp16 = args.precision == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    dtype = torch.float16 if fp16 else torch.bfloat16
    images = torch.randn(args.batch, 3, 224, 224, device=device, generator=torch.Generator(device).manual_seed(0))

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype):
            loss, _, _ = model(images, mask_ratio=0.75)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(args.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    return args.batch * args.steps / (time.perf_counter() - start)


def time_ours(recipe: str, args: argparse.Namespace) -> dict:
    from largessl import bench

    bench_args = argparse.Namespace(
        config=recipe, steps=args.steps, warmup=args.warmup, synthetic=True, data_only=False, json=None,
        overrides=[f"data.micro_batch_size={args.batch}", f"optim.global_batch_size={args.batch}",
                   f"distributed.precision={args.precision}", *args.overrides])
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's notes; the JSON line is ours
        cfg = bench.bench_config(bench_args)
        import tempfile
        from dataclasses import replace

        with tempfile.TemporaryDirectory() as scratch:
            return bench.model_bench(replace(cfg, run=replace(cfg.run, output_dir=scratch)), bench_args)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mae-repo", type=Path, required=True, help="a checkout of facebookresearch/mae")
    parser.add_argument("--model", choices=SIZES, default="base")
    parser.add_argument("--batch", type=int, default=256, help="images per step (one device)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="largessl config overrides for our side (data.train=... needed)")
    args = parser.parse_args()
    if not (args.mae_repo / "models_mae.py").is_file():
        parser.error(f"--mae-repo: {args.mae_repo} has no models_mae.py (a checkout of facebookresearch/mae)")
    name, recipe, _ = SIZES[args.model]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    official = time_official(official_model(args.mae_repo, name), args, device)
    torch.cuda.empty_cache() if device.type == "cuda" else None
    ours = time_ours(recipe, args)
    result = {"model": args.model, "batch": args.batch, "precision": args.precision, "steps": args.steps,
              "device": ours["device"], "official_images_per_sec": official, "ours_images_per_sec":
              ours["images_per_sec"], "ratio": ours["images_per_sec"] / official, "ours_mfu": ours["mfu"],
              "ours_peak_mem_gb": ours["peak_mem_gb"], "git_commit": ours["git_commit"]}
    print(f"MAE ViT-{args.model} at batch {args.batch}, {args.precision}, on {result['device']}: official "
          f"{official:.1f} images/s, ours {ours['images_per_sec']:.1f} images/s: {result['ratio']:.2f}x")
    line = json.dumps(result, sort_keys=True)
    if args.json:
        args.json.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
