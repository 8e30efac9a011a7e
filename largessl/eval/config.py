"""k-NN monitoring during training (methods.md 1.8)."""

from __future__ import annotations

from dataclasses import dataclass

from largessl.config.loader import require

POOLS = ("cls", "mean")


def knn_metric(pool: str) -> str:
    """The metric name of a k-NN top-1 with features `pool`: knn_top1 for [cls], knn_top1_mean for the mean."""
    return "knn_top1" if pool == "cls" else f"knn_top1_{pool}"


@dataclass
class EvalConfig:
    """The k-NN evaluation during training."""

    knn_every: int = 0
    """Run the k-NN evaluation every this many optimizer steps (0: never during training)."""
    knn_k: int = 20
    """Neighbours that vote (DINO's eval_knn: k=20 usually works best)."""
    knn_temperature: float = 0.07
    """Votes are weighted by exp(cosine similarity / temperature)."""
    knn_train: str = ""
    """Labelled dataset whose features are the neighbours; empty: data.train."""
    knn_train_split: str = ""
    """Split of knn_train; empty: data.train_split."""
    knn_val: str = ""
    """Dataset of queries; empty: data.val."""
    knn_val_split: str = ""
    """Split of knn_val; empty: data.val_split."""
    knn_batch_size: int = 0
    """Images per rank per feature-extraction batch; 0: data.micro_batch_size."""
    knn_pool: str = "cls"
    """Feature of an image: 'cls' (the [cls] output) or 'mean' (the mean patch output; CAE trains no [cls] loss)."""
    every: int = 0
    """Evaluation protocols (largessl eval linear|attentive|finetune): top-1 on data.val every this many optimizer
    steps; it is always computed at the end. 0: only at the end."""

    def validate(self, prefix: str = "eval") -> None:
        require(self.knn_every >= 0, f"{prefix}.knn_every", "must be >= 0 (0 disables it)")
        require(self.knn_k > 0, f"{prefix}.knn_k", "must be > 0")
        require(self.knn_temperature > 0, f"{prefix}.knn_temperature", "must be > 0")
        require(self.knn_batch_size >= 0, f"{prefix}.knn_batch_size", "must be >= 0")
        require(self.every >= 0, f"{prefix}.every", "must be >= 0 (0: only at the end)")
        require(self.knn_pool in POOLS, f"{prefix}.knn_pool", f"must be one of {', '.join(POOLS)}")
