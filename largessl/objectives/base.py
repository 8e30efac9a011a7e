"""The objective plugin contract (design.md "Objective").

An objective is one nn.Module holding everything that is learned (encoder, decoders, heads, teachers).
It is single-device PyTorch: the trainer wraps it in the DeepSpeed engine, the data pipeline feeds it.

- `Config`: a dataclass with `name`, `validate(prefix)` and `validate_with_model(model_cfg)`.
- `sample_transform(cfg, model_cfg)`: what the data pipeline makes of one decoded image, run in the
  DataLoader workers under a per-sample seed: a dict of tensors (views, crop boxes, mask noise or mask
  indices). The default collate stacks them into the batch.
- `forward(batch) -> dict`: a "loss" tensor plus detached terms for logging.
- `after_optimizer_step(step)`: once per optimizer step, after it (EMA teachers, DINO centering).
- `eval_encoder()`: the backbone the k-NN evaluation reads (DINO: the teacher).
- `no_weight_decay()`: names of parameters exempt from weight decay beyond norms and biases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from largessl.models import ModelConfig, ViTEncoder

SampleTransform = Callable[[Image.Image], dict[str, torch.Tensor]]


class Objective(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type]
    encoder: ViTEncoder

    @classmethod
    def sample_transform(cls, cfg: Any, model_cfg: ModelConfig) -> SampleTransform:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """Called once per optimizer step, after the update; `step` counts the updates done so far."""

    def eval_encoder(self) -> ViTEncoder:
        return self.encoder

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    def compute_dtype(self) -> torch.dtype:
        """The dtype the parameters are held in for compute (bf16 under DeepSpeed's bf16 mode)."""
        return self.encoder.patch_embed.proj.weight.dtype
