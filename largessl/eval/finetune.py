"""End-to-end fine-tuning (methods.md 2.5 MAE, 4.5 CAE, 5.5 SIM): the whole encoder and a head.

Features: with `pool=avg` (MAE, CAE, SIM) the mean of the patch outputs through a fresh LayerNorm `fc_norm`, the
encoder's final norm removed; with `pool=cls` the [cls] output after it. Head: Linear, weights N(0, 2e-5), bias 0.
Layer-wise lr decay by the BEiT rule (`layer_ids`: stem 0, blocks.i i + 1, the rest depth + 1; optim.layer_decay),
no weight decay on norms, biases, position embeddings and [cls]. The training view is timm's `create_transform`
(RandomResizedCrop bicubic, flip, RandAugment or colour jitter, random erasing in pixel mode); mixup and cutmix
are timm's `Mixup` (batch mode, switch p 0.5, smoothing inside the soft targets) with `SoftTargetCrossEntropy`,
or cross-entropy with label smoothing when both are off.

References: https://github.com/facebookresearch/mae/blob/main/main_finetune.py, models_vit.py, util/lr_decay.py;
https://github.com/Atten4Vis/CAE/blob/master/tools/run_class_finetuning.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from largessl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from largessl.errors import ConfigError
from largessl.eval.protocol import Protocol, normal_linear
from largessl.eval.protocol_config import FinetuneConfig
from largessl.models.config import ModelConfig
from largessl.models.vit import LayerNorm
from largessl.objectives.base import SampleTransform

STEM = ("encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.")


def posterize_any_bits(image: Image.Image, bits: int, **_: object) -> Image.Image:
    """timm's posterize for every level RandAugment draws: 'inc1' reaches 0 bits kept, which Pillow >= 12 refuses
    and older Pillow (with which the recipes were run) turned into a black image, as here."""
    if bits >= 8:
        return image
    return ImageOps.posterize(image, bits) if bits >= 1 else image.point(lambda _: 0)


def use_posterize_any_bits() -> None:
    from timm.data import auto_augment

    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = posterize_any_bits


class FineTuneTransform:
    """timm's training transform with the recipe's augmentations (see the module docstring)."""

    def __init__(self, cfg: FinetuneConfig, image_size: int) -> None:
        from timm.data import create_transform

        use_posterize_any_bits()
        self.augment = create_transform(
            input_size=image_size, is_training=True, scale=cfg.crop_scale, color_jitter=cfg.color_jitter,
            auto_augment=cfg.auto_augment or None, interpolation=cfg.interpolation, re_prob=cfg.random_erasing,
            re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        return {"image": self.augment(image)}


def beit_layer_id(name: str, depth: int) -> int:
    """methods.md 1.6: 0 for the stem, i + 1 for blocks.i, depth + 1 for everything else."""
    if name.startswith(STEM):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


class FineTune(Protocol):
    name = "finetune"
    Config = FinetuneConfig
    frozen_encoder = False

    def __init__(self, cfg: FinetuneConfig, model_cfg: ModelConfig) -> None:
        super().__init__(cfg, model_cfg)
        self.pool = cfg.pool if cfg.pool != "auto" else ("cls" if self.method == "dino" else "avg")
        dim = self.encoder.dim
        if self.pool == "avg":
            self.encoder.norm = nn.Identity()  # MAE deletes it: fc_norm takes its place after the pooling
            self.fc_norm = LayerNorm(dim)
        self.head = normal_linear(dim, cfg.num_classes, cfg.head_init_std)
        self.mixup = self._mixup(cfg)

    @staticmethod
    def _mixup(cfg: FinetuneConfig) -> object | None:
        if not (cfg.mixup > 0 or cfg.cutmix > 0):
            return None
        from timm.data import Mixup

        return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                     label_smoothing=cfg.label_smoothing, num_classes=cfg.num_classes)

    @classmethod
    def sample_transform(cls, cfg: FinetuneConfig, model_cfg: ModelConfig) -> SampleTransform:
        return FineTuneTransform(cfg, model_cfg.image_size)

    def layer_ids(self) -> dict[str, int]:
        depth = len(self.encoder.blocks)
        return {name: beit_layer_id(name, depth) for name, _ in self.named_parameters()}

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(images)
        x = self.fc_norm(tokens[:, 1:].mean(dim=1)) if self.pool == "avg" else tokens[:, 0]
        return self.head(x)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch["image"].to(self.compute_dtype()), batch["label"]
        if self.mixup is None:
            logits = self.classify(images).float()
            loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
            return {"loss": loss, "train_top1": (logits.argmax(dim=1) == labels).float().mean().detach()}
        if images.shape[0] % 2:
            raise ConfigError(f"objective.mixup: timm's batch mixup needs an even micro-batch (data.micro_batch_size "
                              f"gives {images.shape[0]})")
        images, targets = self.mixup(images, labels)
        logits = self.classify(images).float()
        return {"loss": torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()}
