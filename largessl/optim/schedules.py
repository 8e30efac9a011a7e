"""Schedules as pure functions of the optimizer step, applied to every parameter group each step.

DeepSpeed's built-in schedulers are not used (design.md: they mishandle layer-decay groups).
"""

from __future__ import annotations

import math

from largessl.optim.config import OptimConfig


def warmup_cosine(step: int, *, peak: float, final: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 to `peak` over warmup_steps, then a half-cycle cosine to `final` at total_steps.

    As MAE's util/lr_sched.py, per optimizer step instead of per fractional epoch; the first step uses 0.
    """
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    return warmup_cosine(step, peak=cfg.peak_lr(), final=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                         total_steps=total_steps)


def weight_decay_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Constant for MAE; a function of the step so scheduled decays (DINO's 0.04 -> 0.4) plug in here."""
    return cfg.weight_decay


def apply_schedules(param_groups: list[dict], step: int, cfg: OptimConfig, total_steps: int) -> tuple[float, float]:
    """Set lr (x the group's lr_scale) and the scheduled weight decay on every group; returns (lr, wd)."""
    lr, wd = lr_at(step, cfg, total_steps), weight_decay_at(step, cfg, total_steps)
    for group in param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group.get("scheduled_wd"):
            group["weight_decay"] = wd
    return lr, wd
