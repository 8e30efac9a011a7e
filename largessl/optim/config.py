"""Optimizer, batch size and schedule settings."""

from __future__ import annotations

from dataclasses import dataclass

from largessl.config.loader import require
from largessl.epochs import check_pair

OPTIMIZERS = ("adamw", "sgd", "lars")


@dataclass
class OptimConfig:
    """Optimizer (AdamW; SGD and LARS for probes), global batch size, lr and weight-decay schedules, clipping."""

    name: str = "adamw"
    """'adamw'; 'sgd' (momentum, optionally nesterov: DINO's linear eval, CAE's attentive probe); 'lars' (timm's
    LARS, MAE's linear probe: trust ratio 0.001 |w| / |g| on weight matrices, momentum SGD; needs ZeRO-0)."""
    momentum: float = 0.9
    """Momentum of 'sgd' and 'lars'."""
    nesterov: bool = False
    """Nesterov momentum for 'sgd' (CAE's attentive probe)."""
    layer_decay: float = 1.0
    """Layer-wise lr decay (BEiT rule, fine-tuning): blocks.i gets layer_decay^(depth - i), the stem
    layer_decay^(depth + 1), the head 1. 1.0: none. Applies to objectives that number their layers (finetune)."""
    base_lr: float = 1.5e-4
    """Learning rate per 256 images: peak lr = base_lr x global_batch_size / 256 (linear scaling rule)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    global_batch_size: int = 4096
    """Images per optimizer step over all ranks = micro_batch_size x accumulation steps x world size."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to norms, biases, and the objective's exempt parameters)."""
    weight_decay_end: float | None = None
    """If set, weight decay follows a cosine from weight_decay at step 0 to this at max_steps (DINO: 0.04 -> 0.4)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (MAE uses 0.95 for beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    fused: bool = False
    """AdamW as torch's fused kernel (`AdamW(fused=True)`: one kernel per step over all tensors) instead of its
    default multi-tensor (foreach) form; the same update. Off until a GPU measurement says it helps
    (benchmarks/gpu_checks.sh times both)."""
    warmup_steps: int | None = 0
    """Optimizer steps of linear warmup from 0 to the peak lr, then a half-cycle cosine to min_lr."""
    warmup_epochs: float | None = None
    """The warmup in epochs instead of warmup_steps (resolved at start-up, as trainer.epochs)."""
    grad_clip: float = 0.0
    """Global gradient-norm clipping threshold; 0 disables clipping (MAE pretraining does not clip)."""
    wd_on_tokens: bool = False
    """Also decay cls/mask tokens, as the official MAE code does (it only exempts 1-D params and biases)."""

    def validate(self, prefix: str = "optim") -> None:
        require(self.name in OPTIMIZERS, f"{prefix}.name", f"must be one of {', '.join(OPTIMIZERS)}")
        require(0 <= self.momentum < 1, f"{prefix}.momentum", "must be in [0, 1)")
        require(0 < self.layer_decay <= 1, f"{prefix}.layer_decay", "must be in (0, 1] (1: no layer decay)")
        require(self.base_lr > 0, f"{prefix}.base_lr", "must be > 0")
        require(0 <= self.min_lr, f"{prefix}.min_lr", "must be >= 0")
        require(self.global_batch_size > 0, f"{prefix}.global_batch_size", "must be > 0")
        require(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        require(self.weight_decay_end is None or self.weight_decay_end >= 0, f"{prefix}.weight_decay_end",
                "must be >= 0 (or null for a constant weight decay)")
        require(all(0 <= b < 1 for b in self.betas), f"{prefix}.betas", "each beta must be in [0, 1)")
        require(not self.fused or self.name == "adamw", f"{prefix}.fused", "applies to adamw only")
        check_pair(self, prefix, "warmup_epochs", "warmup_steps")
        require(self.warmup_steps is None or self.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
        require(self.grad_clip >= 0, f"{prefix}.grad_clip", "must be >= 0 (0 disables clipping)")

    def peak_lr(self) -> float:
        return self.base_lr * self.global_batch_size / 256
