"""The evaluation protocols' config sections (`objective.*` of an evaluation run), one dataclass per protocol.

An evaluation runs through the pretraining trainer as an objective (design.md): `largessl eval linear|attentive|
finetune` builds a config whose objective is one of these, whose model section is the pretraining run's, and whose
encoder starts from that run's checkpoint. Torch-free, like every config module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from largessl.config.loader import check_scale_range, require
from largessl.models.config import ModelConfig

LINEAR_FEATURES = ("auto", "cls", "mean", "mean_norm", "last4_cls", "cls_mean")
POOLS = ("auto", "cls", "avg")
INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass
class ProtocolConfig:
    """What every protocol shares: the pretraining run it evaluates, the classes, the training crop."""

    evaluates: ClassVar[bool] = True
    name: str = ""
    """Objective name (selects the protocol's config section)."""
    checkpoint: str = ""
    """Pretraining run directory, or a file `largessl export` wrote, whose encoder is evaluated (`largessl eval
    ... --checkpoint` sets it)."""
    checkpoint_step: int | None = None
    """Its checkpoint at this step; null: the newest complete one (`--step`)."""
    num_classes: int = 0
    """Classes of the head; `largessl eval` sets it from the train split's dataset.json."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range of the training view (then a horizontal flip)."""
    interpolation: str = "bicubic"
    """Resize interpolation of the training crop (MAE, CAE: bicubic; DINO's linear eval: bilinear)."""
    head_init_std: float = 0.01
    """Std of the head's normal initial weights (bias 0)."""

    def validate(self, prefix: str = "objective") -> None:
        require(bool(self.checkpoint), f"{prefix}.checkpoint", "must name the pretraining run directory (largessl "
                "eval sets it from --checkpoint)")
        require(self.checkpoint_step is None or self.checkpoint_step >= 0, f"{prefix}.checkpoint_step", "must be >= 0")
        require(self.num_classes > 1, f"{prefix}.num_classes", "must be > 1 (largessl eval sets it from the train "
                "split's classes)")
        check_scale_range(self.crop_scale, f"{prefix}.crop_scale")
        require(self.interpolation in INTERPOLATIONS, f"{prefix}.interpolation",
                f"must be one of {', '.join(INTERPOLATIONS)}")
        require(self.head_init_std > 0, f"{prefix}.head_init_std", "must be > 0")

    def validate_with_model(self, model: ModelConfig) -> None:
        """An evaluation starts from its --checkpoint: model.init_from has no place here."""
        require(not model.init_from, "model.init_from",
                "an evaluation starts from the pretrained encoder --checkpoint names; leave model.init_from unset")


@dataclass
class LinearConfig(ProtocolConfig):
    """Linear probe (objective.name=linear): frozen features -> [BatchNorm without affine] -> Linear."""

    name: str = "linear"
    """Objective name (selects this config section)."""
    features: str = "auto"
    """'cls' ([cls] after the final norm: MAE, CAE), 'mean' (mean patch output), 'mean_norm' (mean patch output
    through a fresh LayerNorm: SIM), 'last4_cls' (the [cls] of the last 4 blocks, each normed, concatenated: DINO
    ViT-S), 'cls_mean' ([cls] and mean patch output of the last block: DINO ViT-B); 'auto': the method's own."""
    head_norm: bool = True
    """BatchNorm1d without affine (eps 1e-6) before the Linear, as MAE, CAE and SIM; DINO has none."""

    def validate(self, prefix: str = "objective") -> None:
        super().validate(prefix)
        require(self.features in LINEAR_FEATURES, f"{prefix}.features", f"must be one of {', '.join(LINEAR_FEATURES)}")


@dataclass
class AttentiveConfig(ProtocolConfig):
    """Attentive probe (objective.name=attentive): one query token cross-attends the frozen tokens -> BN -> Linear."""

    name: str = "attentive"
    """Objective name (selects this config section)."""


@dataclass
class FinetuneConfig(ProtocolConfig):
    """Fine-tuning (objective.name=finetune): the whole encoder plus a head, layer decay, mixup/cutmix."""

    name: str = "finetune"
    """Objective name (selects this config section)."""
    pool: str = "auto"
    """'avg' (mean patch output through a fresh fc_norm LayerNorm; the encoder's final norm unused: MAE, CAE,
    SIM), 'cls' ([cls] after the final norm); 'auto': avg, except cls for DINO."""
    head_init_std: float = 2e-5
    """Std of the head's initial weights (MAE: trunc-normal 2e-5; CAE: 0.02 x init_scale 0.001)."""
    mixup: float = 0.8
    """Mixup alpha (0: off); timm's Mixup, batch mode, switching with cutmix at p 0.5."""
    cutmix: float = 1.0
    """CutMix alpha (0: off)."""
    label_smoothing: float = 0.1
    """Label smoothing (inside mixup's soft targets when mixup or cutmix is on)."""
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    """timm auto-augment policy of the training view ('' for none: CAE)."""
    color_jitter: float = 0.4
    """timm create_transform color jitter (used when auto_augment is '')."""
    random_erasing: float = 0.25
    """Random erasing probability (pixel mode, one region)."""

    def validate(self, prefix: str = "objective") -> None:
        super().validate(prefix)
        require(self.pool in POOLS, f"{prefix}.pool", f"must be one of {', '.join(POOLS)}")
        require(self.mixup >= 0 and self.cutmix >= 0, f"{prefix}.mixup", "mixup and cutmix alphas must be >= 0")
        require(0 <= self.label_smoothing < 1, f"{prefix}.label_smoothing", "must be in [0, 1)")
        require(0 <= self.random_erasing <= 1, f"{prefix}.random_erasing", "must be in [0, 1]")
        require(self.color_jitter >= 0, f"{prefix}.color_jitter", "must be >= 0")


PROTOCOL_CONFIGS: dict[str, type] = {"linear": LinearConfig, "attentive": AttentiveConfig, "finetune": FinetuneConfig}
METRICS = {name: f"{name}_top1" for name in (*PROTOCOL_CONFIGS, "fewshot")}
