"""Paired k-NN comparison of two runs' evaluation encoders on the same queries, with an exact McNemar test.

Two accuracies on the same 3,925 queries are not independent samples, so their standard errors overstate the
uncertainty of the difference; counting the queries only one model gets right gives a paired test.

    python benchmarks/knn_paired.py RUN_A RUN_B DATA_DIR [--k 20] [--temperature 0.07] [--pool cls|mean]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from largessl.eval.knn import discordant, knn_correct, mcnemar_exact
from largessl.eval.standalone import checkpoint_features


def correct_queries(run_dir: Path, data: str, k: int, temperature: float,
                    pool: str = "cls") -> tuple[torch.Tensor, str]:
    """[Q] bool: which val queries the run's latest checkpoint classifies correctly; and that checkpoint."""
    (train, val), _, _, tag_dir = checkpoint_features(run_dir, data, data, train_split="train", val_split="val",
                                                      batch_size=128, num_workers=1, pool=pool)
    return knn_correct(train, val, k=k, temperature=temperature), str(tag_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("data", help="dataset directory with train and val splits")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--pool", choices=("cls", "mean"), default="cls", help="[cls] or mean patch features")
    args = parser.parse_args()
    a, tag_a = correct_queries(args.run_a, args.data, args.k, args.temperature, args.pool)
    b, tag_b = correct_queries(args.run_b, args.data, args.k, args.temperature, args.pool)
    only_a, only_b = discordant(a, b)
    print(f"A {tag_a}: {a.float().mean():.4f}\nB {tag_b}: {b.float().mean():.4f}\n"
          f"right only in A: {only_a}, only in B: {only_b}, exact McNemar two-sided p = "
          f"{mcnemar_exact(only_a, only_b):.1e}")


if __name__ == "__main__":
    main()
