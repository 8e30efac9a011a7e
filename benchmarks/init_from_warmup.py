"""Continued pretraining from a released encoder, with and without the encoder frozen while the fresh head learns
(model.init_from, model.freeze_encoder_steps): the k-NN top-1 of the starting encoder, after the warm-up, and at
the end, on the same queries, with paired McNemar tests against the start.

The "released" encoder is made here (no download is possible): a DINO ViT-Tiny pretrained SOURCE_STEPS on the
data and exported as a backbone file (as DINO releases its backbones, without the head). Two runs then continue
from it with a fresh DINO head: one trains everything at once, the other keeps the encoder frozen for WARMUP
steps. The runs use the same images as the source, so this measures what a fresh head does to learned features,
not what a new domain gains.

    python benchmarks/init_from_warmup.py DATA_DIR WORKDIR [--source-steps 300] [--steps 150] [--warmup 50]

DATA_DIR holds train and val splits (`make demo` leaves demo/shards). Takes about 23 minutes on 2 CPU cores
(docs/benchmarks.md has its numbers).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from largessl.eval.knn import discordant, knn_correct, mcnemar_exact
from largessl.eval.standalone import checkpoint_features

RECIPE = ["--config", "debug/dino_vit_tiny", "tracking.enabled=false", "eval.knn_every=0"]


def largessl(workdir: Path, *args: str) -> None:
    """`python -m largessl ARGS` in `workdir`; its output passes through; a failure stops the benchmark."""
    print("$ largessl " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "largessl", *args], cwd=workdir, check=True)


def correct(run_dir: Path, step: int, data: str) -> torch.Tensor:
    """[Q] bool: the val queries the run's checkpoint of `step` (its teacher) classifies right (k=20, T=0.07)."""
    (train, val), _, _, _ = checkpoint_features(run_dir, data, data, train_split="train", val_split="val",
                                                batch_size=128, num_workers=1, step=step)
    return knn_correct(train, val, k=20, temperature=0.07)


def versus(start: torch.Tensor, later: torch.Tensor) -> str:
    """'0.4650 (+0.0100 vs start, McNemar p = 0.62)'."""
    only_start, only_later = discordant(start, later)
    p = mcnemar_exact(only_start, only_later)
    return (f"{later.float().mean():.4f} ({later.float().mean() - start.float().mean():+.4f} vs start, "
            f"McNemar p = {p:.2g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--source-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    data, work = str(args.data.resolve()), args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    shared = [*RECIPE, f"data.train={data}", f"data.val={data}", "trainer.keep_last=5"]
    largessl(work, "pretrain", *shared, "run.name=source", f"trainer.max_steps={args.source_steps}")
    backbone = work / "source.safetensors"
    largessl(work, "export", "runs/source", "--out", str(backbone))
    for name, freeze in (("no_freeze", 0), ("freeze", args.warmup)):
        largessl(work, "pretrain", *shared, f"run.name={name}", f"trainer.max_steps={args.steps}",
                 f"trainer.ckpt_every={args.warmup}", f"model.init_from={backbone}",
                 f"model.freeze_encoder_steps={freeze}")
    start = correct(work / "runs" / "source", args.source_steps, data)
    print(f"\nk-NN top-1 on {start.numel()} queries (k=20, T=0.07; DINO's teacher)")
    print(f"start (the exported encoder, source step {args.source_steps}): {start.float().mean():.4f}")
    for name in ("no_freeze", "freeze"):
        for step in (args.warmup, args.steps):
            print(f"{name} step {step}: {versus(start, correct(work / 'runs' / name, step, data))}")


if __name__ == "__main__":
    main()
