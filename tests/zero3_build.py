"""Run under torchrun: build MAE with encoder ARGV[1] through largessl's ZeRO-3 path and write what each rank
holds to ARGV[2]/rank{N}.json. Used by test_train.py."""

import json
import sys
from pathlib import Path

from largessl.distributed.config import DistributedConfig
from largessl.distributed.engine import deepspeed_config, init_distributed, model_init_context
from largessl.models.config import ModelConfig
from largessl.objectives.mae import MAE, MAEConfig

cfg = DistributedConfig(zero_stage=3, precision="fp32")
env = init_distributed(cfg)
ds = deepspeed_config(cfg, micro_batch=1, accumulation=1, world_size=env.world_size, grad_clip=0.0)
with model_init_context(ds):
    model = MAE(MAEConfig(), ModelConfig(name=sys.argv[1]))
params = list(model.parameters())
(Path(sys.argv[2]) / f"rank{env.rank}.json").write_text(json.dumps({
    "rank": env.rank,
    "total": sum(p.ds_numel for p in params),
    "local": sum(p.ds_tensor.numel() for p in params),
    "largest_full_tensor": max(p.numel() for p in params),  # what stays materialised outside the partitions
}))
