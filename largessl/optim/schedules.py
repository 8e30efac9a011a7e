"""Schedules as pure functions of the optimizer step, applied to every parameter group each step.

DeepSpeed's built-in schedulers are not used (design.md: they mishandle layer-decay groups).
"""

from __future__ import annotations

import math

from largessl.optim.config import OptimConfig


def cosine(step: int, *, start: float, end: float, total_steps: int) -> float:
    """Half-cycle cosine from `start` at step 0 to `end` at total_steps (DINO's cosine_scheduler without
    warmup: weight decay 0.04 -> 0.4, teacher momentum 0.996 -> 1)."""
    progress = min(1.0, step / max(1, total_steps))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, *, peak: float, final: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 to `peak` over warmup_steps, then a half-cycle cosine to `final` at total_steps.

    As MAE's util/lr_sched.py, per optimizer step instead of per fractional epoch; the first step uses 0.
    """
    if step < warmup_steps:
        return peak * step / warmup_steps
    return cosine(step - warmup_steps, start=peak, end=final, total_steps=total_steps - warmup_steps)


def linear_warmup(step: int, *, start: float, end: float, warmup_steps: int) -> float:
    """`start` at step 0 rising linearly to `end` at step warmup_steps - 1, then constant (np.linspace over the
    warmup, as DINO's teacher temperature)."""
    if warmup_steps <= 1 or step >= warmup_steps - 1:
        return end
    return start + (end - start) * step / (warmup_steps - 1)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    return warmup_cosine(step, peak=cfg.peak_lr(), final=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                         total_steps=total_steps)


def weight_decay_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Constant (MAE), or a cosine from weight_decay to weight_decay_end (DINO: 0.04 -> 0.4)."""
    if cfg.weight_decay_end is None:
        return cfg.weight_decay
    return cosine(step, start=cfg.weight_decay, end=cfg.weight_decay_end, total_steps=total_steps)


def apply_schedules(param_groups: list[dict], step: int, cfg: OptimConfig, total_steps: int) -> tuple[float, float]:
    """Set lr (x the group's lr_scale) and the scheduled weight decay on every group; returns (lr, wd).

    Groups frozen at the start (`frozen_steps`, DINO's last layer) get lr 0 and weight decay 0 until then, so
    AdamW leaves their weights exactly as they are."""
    lr, wd = lr_at(step, cfg, total_steps), weight_decay_at(step, cfg, total_steps)
    for group in param_groups:
        frozen = step < group.get("frozen_steps", 0)
        group["lr"] = 0.0 if frozen else lr * group.get("lr_scale", 1.0)
        if group.get("scheduled_wd"):
            group["weight_decay"] = 0.0 if frozen else wd
    return lr, wd
