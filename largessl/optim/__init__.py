"""Parameter groups and schedules."""

from largessl.optim.config import OptimConfig
from largessl.optim.param_groups import build_param_groups
from largessl.optim.schedules import apply_schedules, lr_at, warmup_cosine

__all__ = ["OptimConfig", "apply_schedules", "build_param_groups", "lr_at", "warmup_cosine"]
