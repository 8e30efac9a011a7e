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


def build_param_groups(module: Objective, cfg: OptimConfig, also_frozen: dict[str, int] | None = None) -> list[dict]:
    """Decayed and exempt parameters, each split again by the objective's frozen-at-start prefixes and
    `also_frozen`'s (model.freeze_encoder_steps: a group per prefix, so its lr, weight decay and optimizer state can
    be handled on their own) and, with optim.layer_decay < 1, by layer (methods.md 1.6: `lr_scale` =
    layer_decay^(top - layer id))."""
    exempt = module.no_weight_decay()
    frozen = {prefix: steps for prefix, steps in {**module.frozen_at_start(), **(also_frozen or {})}.items()
              if steps > 0}
    layers = module.layer_ids() if cfg.layer_decay < 1 else {}
    top = max(layers.values(), default=0)
    groups: dict[tuple[bool, str, int], dict] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        decayed = is_decayed(name, param, exempt, cfg.wd_on_tokens)
        prefix = next((p for p in frozen if name.startswith(p)), "")
        layer = layers.get(name, top)
        group = groups.setdefault((decayed, prefix, layer), {
            "name": ("decay" if decayed else "no_decay") + (f":{prefix}" if prefix else "")
                    + (f":layer{layer}" if layers else ""),
            "params": [], "weight_decay": cfg.weight_decay if decayed else 0.0,
            "lr_scale": cfg.layer_decay ** (top - layer) if layers else 1.0,
            "scheduled_wd": decayed, "frozen_steps": frozen.get(prefix, 0)})
        group["params"].append(param)
    # group 0: decay, as DINO; then by layer
    return sorted(groups.values(), key=lambda g: (g["name"].split(":")[0] != "decay", g["name"].split(":")[0],
                                                  g["name"]))
