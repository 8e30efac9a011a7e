"""The client optimizer DeepSpeed steps: AdamW (pretraining, fine-tuning), SGD or LARS (probes).

LARS is timm's (`timm.optim.Lars`), as MAE's linear probe uses MoCo v3's: on weight matrices the update is
scaled by the trust ratio 0.001 |w| / |g| (1 when either norm is 0), then momentum SGD; biases and other 1-D
parameters get plain momentum SGD. With the probe's weight decay of 0 timm's ratio is MoCo v3's (timm adds an eps
of 1e-8 to the denominator, and with decay would use |g| + wd |w| where MoCo v3 uses |g + wd w|). The norms are
per tensor, so LARS needs whole tensors: ZeRO-0 (PretrainConfig.validate says so).
"""

from __future__ import annotations

import torch

from largessl.optim.config import OptimConfig


def make_optimizer(param_groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer over our parameter groups, lr 0 (the schedule sets each group's lr every step)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=0.0, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "lars":
        from timm.optim import Lars

        for group in param_groups:  # adapt weight matrices (the decayed group), not biases
            group["always_adapt"] = bool(group.get("scheduled_wd"))
            group["trust_coeff"] = 0.001
        return Lars(param_groups, lr=0.0, momentum=cfg.momentum, trust_coeff=0.001)
    return torch.optim.AdamW(param_groups, lr=0.0, betas=cfg.betas, eps=cfg.eps, fused=cfg.fused or None)
