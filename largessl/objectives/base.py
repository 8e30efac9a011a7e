"""The objective plugin contract (design.md "Objective").

An objective is one nn.Module holding everything that is learned (encoder, decoders, heads, teachers).
It is single-device PyTorch: the trainer wraps it in the DeepSpeed engine, the data pipeline feeds it.

- `Config`: a dataclass with `name`, `validate(prefix)` and `validate_with_model(model_cfg)`.
- `encoder_layout(cfg)`: the ViTEncoder arguments of the method's encoder (for evaluating it).
- `sample_transform(cfg, model_cfg)`: what the data pipeline makes of one decoded image, run in the
  DataLoader workers under a per-sample seed: a dict of tensors (views, crop boxes, mask noise or mask
  indices). The default collate stacks them into the batch.
- `forward(batch) -> dict`: a "loss" tensor plus detached scalars, all logged.
- `begin_step(step, total_steps)`: before each optimizer step's micro-batches (schedules read in forward).
- `after_optimizer_step(step)`: once per optimizer step, after it (DINO centering).
- `teacher_pairs()` / `teacher_momentum()`: parameters an EMA teacher follows and the momentum of the update
  after the current step; the trainer runs the update (distributed/ema.py, exact fp32 under any ZeRO stage).
- `frozen_at_start()`: parameter-name prefixes that get lr 0 and weight decay 0 for their first steps.
- `extra_state()` / `load_extra_state()`: small replicated state kept outside the module (DINO's center),
  saved in checkpoints.
- `eval_encoder()`: the backbone the k-NN evaluation reads (DINO: the teacher).
- `no_weight_decay()`: names of parameters exempt from weight decay beyond norms and biases.
- `layer_ids()`: parameter name -> layer id for layer-wise lr decay (fine-tuning); empty: none.
- `initial_weights()`: weights to load before training starts (an evaluation's pretrained encoder); the trainer
  loads them (ZeRO-3 aware), and a resumed run's checkpoint then replaces them.
- `metric` / `classify(images)`: an evaluation protocol's top-1 name and its logits; the trainer computes the
  top-1 on the val split every eval.every steps and at the end.
- `run_tags()`: extra MLflow tags of the run (an evaluation's pretraining run).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from largessl.models.config import ModelConfig
from largessl.models.flops import Flops
from largessl.models.vit import ViTEncoder

SampleTransform = Callable[[Image.Image], dict[str, torch.Tensor]]


class Objective(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type]
    metric: ClassVar[str] = ""
    encoder: ViTEncoder

    @classmethod
    def sample_transform(cls, cfg: Any, model_cfg: ModelConfig) -> SampleTransform:
        raise NotImplementedError

    @classmethod
    def encoded_views(cls, cfg: Any, model_cfg: ModelConfig) -> tuple[Callable, Callable] | None:
        """For data.decode=gpu (data/gpu_decode.py): (the worker transform of a checked JPEG, the device stage
        that decodes and augments the batch); None where the method has no GPU input path yet."""
        return None

    @classmethod
    def input_transforms(cls, cfg: Any, model_cfg: ModelConfig, decode: str) -> tuple[Callable, Callable | None]:
        """(the DataLoader workers' per-sample transform, the device stage or None) for data.decode."""
        if decode == "cpu":
            return cls.sample_transform(cfg, model_cfg), None
        views = cls.encoded_views(cfg, model_cfg)
        if views is None:
            from largessl.errors import UserError

            raise UserError(f"data.decode=gpu: {cls.name} has no GPU input path (the pretraining methods "
                            "have one); use data.decode=cpu")
        return views

    @classmethod
    def encoder_layout(cls, cfg: Any) -> dict[str, Any]:
        """ViTEncoder keyword arguments that make this method's encoder (position table, init, layer scale, final
        norm); the evaluation protocols build a run's encoder from them."""
        return {}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def begin_step(self, step: int, total_steps: int) -> None:
        """Called before the micro-batches of each optimizer step; `step` counts the updates done so far."""

    def after_optimizer_step(self, step: int) -> None:
        """Called once per optimizer step, after the update; `step` counts the updates done so far."""

    def teacher_pairs(self) -> list[tuple[str, str]]:
        """(teacher parameter name, student parameter name) for every parameter an EMA teacher follows."""
        return []

    def teacher_momentum(self) -> float:
        """m of the EMA update t <- m t + (1 - m) s made after the current optimizer step."""
        raise NotImplementedError

    def frozen_at_start(self) -> dict[str, int]:
        """Parameter-name prefix -> optimizer steps during which those parameters do not move; their optimizer
        state is reset when the freeze ends, so the first real update is a fresh AdamW step."""
        return {}

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what extra_state() returned (on CPU)."""

    def flops_per_image(self) -> Flops:
        """Forward FLOPs per image of one training step, trained and no-grad parts (models/flops.py): the FLOP
        model behind `mfu` and `largessl bench`."""
        raise NotImplementedError(f"{self.name} has no FLOP model")

    def eval_encoder(self) -> ViTEncoder:
        return self.encoder

    def trained_encoder(self) -> ViTEncoder:
        """The encoder the optimizer trains (DINO: the student's backbone): what model.init_from starts."""
        return self.encoder

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    def layer_ids(self) -> dict[str, int]:
        return {}

    def initial_weights(self) -> dict[str, torch.Tensor]:
        return {}

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} is not a classifier")

    def run_tags(self) -> dict[str, str]:
        return {}

    def compute_dtype(self) -> torch.dtype:
        """The dtype the parameters are held in for compute (bf16 under DeepSpeed's bf16 mode)."""
        return self.encoder.patch_embed.proj.weight.dtype
