"""AdamW parameter groups: weight decay on weight matrices only.

No decay on norms, biases (any 1-D parameter), position embeddings, cls and mask tokens. The last two
are decayed by the official MAE code (it only exempts 1-D parameters and biases); `optim.wd_on_tokens`
restores that behaviour.
"""

from __future__ import annotations

import torch

from largessl.objectives.base import Objective
from largessl.optim.config import OptimConfig


def _ndim(param: torch.Tensor) -> int:
    # Under ZeRO-3 a parameter is a flat partition; its real shape is kept in ds_shape.
    return len(getattr(param, "ds_shape", param.shape))


def is_decayed(name: str, param: torch.Tensor, exempt: set[str], wd_on_tokens: bool) -> bool:
    if _ndim(param) <= 1 or name.endswith(".bias"):
        return False
    if name in exempt:
        return wd_on_tokens and name.endswith("_token")
    return True


def build_param_groups(module: Objective, cfg: OptimConfig) -> list[dict]:
    exempt = module.no_weight_decay()
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (decay if is_decayed(name, param, exempt, cfg.wd_on_tokens) else no_decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0, "scheduled_wd": True},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "scheduled_wd": False},
    ]
    return [g for g in groups if g["params"]]  # DeepSpeed mishandles empty groups
