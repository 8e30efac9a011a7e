"""Run under torchrun: build an objective on encoder ARGV[1] through largessl's ZeRO-3 path and write what each rank
holds to ARGV[2]/rank{N}.json. Without ARGV[3]: MAE with its default config (test_train.py). With ARGV[3], a recipe
name (e.g. pretrain/cae_vith14): the objective that recipe names, with the recipe's objective and model sections
(whose model.name must be ARGV[1]) (test_cae_train.py)."""

import json
import sys
from collections import Counter
from pathlib import Path

from largessl.config.load import load_config
from largessl.distributed.config import DistributedConfig
from largessl.distributed.engine import deepspeed_config, init_distributed, model_init_context
from largessl.models.config import ModelConfig
from largessl.objectives import objective_class
from largessl.objectives.mae import MAE, MAEConfig

cfg = DistributedConfig(zero_stage=3, precision="fp32")
env = init_distributed(cfg)
ds = deepspeed_config(cfg, micro_batch=1, accumulation=1, world_size=env.world_size, grad_clip=0.0)
if len(sys.argv) > 3:
    recipe = load_config(sys.argv[3])
    assert recipe.model.name == sys.argv[1], (recipe.model.name, sys.argv[1])
    with model_init_context(ds):
        model = objective_class(recipe.objective.name)(recipe.objective, recipe.model)
else:
    with model_init_context(ds):
        model = MAE(MAEConfig(), ModelConfig(name=sys.argv[1]))
named = list(model.named_parameters())
params = [p for _, p in named]
parts = Counter()
for name, p in named:
    parts[name.split(".")[0]] += p.ds_numel
(Path(sys.argv[2]) / f"rank{env.rank}.json").write_text(json.dumps({
    "rank": env.rank,
    "objective": type(model).__name__,
    "total": sum(p.ds_numel for p in params),
    "local": sum(p.ds_tensor.numel() for p in params),
    "largest_full_tensor": max(p.numel() for p in params),  # what stays materialised outside the partitions
    "parts": dict(parts),  # full parameter count per top-level submodule (encoder, decoder, ...)
}))
