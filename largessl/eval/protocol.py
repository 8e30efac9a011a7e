"""What the evaluation protocols share: the encoder of a pretraining run, its weights, the views, the loss.

A protocol is an Objective (objectives/base.py), so the trainer runs it like a pretraining method: DeepSpeed, bf16,
checkpoints and resume, SLURM signals and MLflow come with it. Its encoder is built with the pretraining method's
layout (position table, layer scale, final norm; `Objective.encoder_layout`) and starts from the run's checkpoint
(`initial_weights`, which the trainer loads before DeepSpeed takes the module); a resumed evaluation's own
checkpoint then replaces it. DINO and SIM are evaluated on what their papers evaluate (`eval_encoder`: DINO's
teacher; SIM's online encoder).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode, v2

from largessl.config.schema import PretrainConfig
from largessl.data.transforms import to_normalized_tensor
from largessl.eval.protocol_config import METRICS, ProtocolConfig
from largessl.eval.source import open_pretrained, run_config
from largessl.models import flops
from largessl.models.config import ModelConfig
from largessl.models.flops import Flops
from largessl.models.vit import ViTEncoder
from largessl.objectives import objective_class
from largessl.objectives.base import Objective, SampleTransform


@cache
def pretraining_config(checkpoint: str) -> PretrainConfig:
    """The resolved config of the pretraining run at `checkpoint` (a run directory or an export)."""
    return run_config(Path(checkpoint), arg="objective.checkpoint")


class ProbeTransform:
    """A protocol's training view: RandomResizedCrop + horizontal flip + ImageNet normalisation (methods.md 1.7)."""

    def __init__(self, image_size: int, crop_scale: tuple[float, float], interpolation: str) -> None:
        self.augment = v2.Compose([
            v2.RandomResizedCrop(image_size, scale=crop_scale, interpolation=InterpolationMode(interpolation),
                                 antialias=True),
            v2.RandomHorizontalFlip(),
            *to_normalized_tensor(),
        ])

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return {"image": self.augment(image)}


def normal_linear(dim: int, num_classes: int, std: float) -> nn.Linear:
    """The head: Linear(dim, classes), weights N(0, std), bias 0 (MAE/CAE trunc-normal at this std is the same
    distribution to within its 2-std tails)."""
    head = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(head.bias)
    return head


class Protocol(Objective):
    """A head (or the whole encoder and a head) trained with cross-entropy on labelled images."""

    Config: ClassVar[type] = ProtocolConfig
    frozen_encoder: ClassVar[bool] = True

    def __init__(self, cfg: ProtocolConfig, model_cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        run = pretraining_config(cfg.checkpoint)
        self.method = run.objective.name
        layout = objective_class(self.method).encoder_layout(run.objective)
        self.encoder = ViTEncoder.from_config(model_cfg, **layout)
        if self.frozen_encoder:
            self.encoder.requires_grad_(False)

    @property
    def metric(self) -> str:  # type: ignore[override]
        return METRICS[self.name]

    @classmethod
    def sample_transform(cls, cfg: ProtocolConfig, model_cfg: ModelConfig) -> SampleTransform:
        return ProbeTransform(model_cfg.image_size, cfg.crop_scale, cfg.interpolation)

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """The pretraining run's eval encoder (fp32, from any ZeRO stage), as `encoder.*` of this module."""
        from largessl.eval.standalone import load_encoder

        encoder, _, _, _ = load_encoder(Path(self.cfg.checkpoint), self.cfg.checkpoint_step, arg="objective.checkpoint")
        ours = self.state_dict()  # without what the protocol replaces (fine-tuning's final norm)
        return {f"encoder.{name}": value for name, value in encoder.state_dict().items() if f"encoder.{name}" in ours}

    def run_tags(self) -> dict[str, str]:
        """protocol, pretrain_method, pretrain_run_dir, pretrain_step and pretrain_run_id (its MLflow run, as
        RUN_DIR/mlflow_run.json, the checkpoint or the export names it; '' when none does)."""
        pretrained = open_pretrained(Path(self.cfg.checkpoint), self.cfg.checkpoint_step, "objective.checkpoint")
        run_id, _ = pretrained.recorded()
        return {"protocol": self.name, "pretrain_method": self.method,
                "pretrain_run_dir": str(pretrained.path.resolve()), "pretrain_step": str(pretrained.step),
                "pretrain_run_id": run_id}

    def flops_per_image(self) -> Flops:
        """The encoder on the whole image (without gradients when frozen), then the head."""
        encoder = flops.encoder(self.encoder, self.encoder.num_patches + 1)
        if self.frozen_encoder:
            return Flops(trained=self.head_flops(), no_grad=encoder)
        return Flops(trained=encoder + self.head_flops())

    def head_flops(self) -> float:
        """Forward FLOPs per image of what sits on the encoder's tokens."""
        return flops.per_token(self.head)

    def encoder_tokens(self, images: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The encoder's output tokens; without a graph when it is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_encoder):
            return self.encoder(images, **kwargs)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.classify(batch["image"].to(self.compute_dtype())).float()
        labels = batch["label"]
        loss = F.cross_entropy(logits, labels)
        return {"loss": loss, "train_top1": (logits.argmax(dim=1) == labels).float().mean().detach()}
