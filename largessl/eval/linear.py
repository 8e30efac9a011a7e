"""Linear probe on frozen features (methods.md 1.7 for MAE, CAE and SIM; 3.5 for DINO).

MAE/CAE: the [cls] output after the final norm; SIM: the mean patch output through a fresh LayerNorm (`fc_norm`;
SIM's encoder has no final norm). Then BatchNorm1d without affine (eps 1e-6) and Linear(D, classes), weights
N(0, 0.01), bias 0; only the head trains, with LARS (optim.name=lars). DINO's linear evaluation: the [cls] of the
last 4 blocks, each through the final norm, concatenated (ViT-S), or the last block's [cls] and mean patch output
(ViT-B and larger); Linear without BN; SGD.

Deviation: the BatchNorm's statistics span all ranks' batches (TokenSyncBatchNorm) where MAE's are per GPU; with
MAE's 16,384-image batch over 32 GPUs the two are the same to within sampling noise, and ours do not depend on
the world size. The training crop is torchvision's RandomResizedCrop (up to 10 draws) where MAE's linear probe
uses a single-draw variant (util/crop.py), which differs only on the rare draws that do not fit the image.

References: https://github.com/facebookresearch/mae/blob/main/main_linprobe.py,
https://github.com/facebookresearch/dino/blob/main/eval_linear.py (LinearClassifier),
https://github.com/OpenGVLab/Siamese-Image-Modeling/blob/main/main_linprobe.py
"""

from __future__ import annotations

import torch

from largessl.eval.protocol import Protocol, normal_linear
from largessl.eval.protocol_config import LinearConfig
from largessl.models.batchnorm import TokenSyncBatchNorm, load_norm_state, norm_state
from largessl.models.config import ModelConfig
from largessl.models.vit import LayerNorm

WIDTH_FACTOR = {"cls": 1, "mean": 1, "mean_norm": 1, "last4_cls": 4, "cls_mean": 2}


def method_features(method: str, width: int) -> str:
    """The features a method's paper probes (objective.features=auto)."""
    if method == "dino":
        return "last4_cls" if width <= 384 else "cls_mean"
    return "mean_norm" if method == "sim" else "cls"


class LinearProbe(Protocol):
    name = "linear"
    Config = LinearConfig

    def __init__(self, cfg: LinearConfig, model_cfg: ModelConfig) -> None:
        super().__init__(cfg, model_cfg)
        width = self.encoder.dim
        self.features = cfg.features if cfg.features != "auto" else method_features(self.method, width)
        self.fc_norm = LayerNorm(width) if self.features == "mean_norm" else None
        dim = width * WIDTH_FACTOR[self.features]
        self.head_norm = TokenSyncBatchNorm(dim, eps=1e-6, affine=False) if cfg.head_norm else None
        self.head = normal_linear(dim, cfg.num_classes, cfg.head_init_std)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """[B, D'] frozen features of `images` (see the module docstring)."""
        if self.features in ("last4_cls", "cls_mean"):
            blocks = self.encoder_tokens(images, last_blocks=4 if self.features == "last4_cls" else 1)
            if self.features == "last4_cls":
                return torch.cat(list(blocks[:, :, 0]), dim=-1)
            return torch.cat([blocks[-1][:, 0], blocks[-1][:, 1:].mean(dim=1)], dim=-1)
        tokens = self.encoder_tokens(images)
        return tokens[:, 0] if self.features == "cls" else tokens[:, 1:].mean(dim=1)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        x = self.extract(images)
        if self.fc_norm is not None:
            x = self.fc_norm(x)
        if self.head_norm is not None:
            x = self.head_norm(x[:, None])[:, 0]
        return self.head(x)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return norm_state(self)

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        load_norm_state(self, state)
