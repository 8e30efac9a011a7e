"""What the encoder is: its named size, input resolution and memory switches."""

from __future__ import annotations

import re
from dataclasses import dataclass

from largessl.config.loader import require
from largessl.epochs import check_pair

# name -> (width, depth, heads); MLP ratio 4 for all (methods.md 1.1, plus timm's ViT-Tiny for tests).
VIT_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
MODEL_NAME = re.compile(r"vit_(?P<size>[a-z]+)_patch(?P<patch>\d{1,4})$")
MAX_IMAGE_SIZE = 4096  # pixels a side: 65,536 patches of 16; beyond, a config is a mistake (or a file's lie)


@dataclass
class ModelConfig:
    """The encoder: its size, input resolution and memory switches."""

    name: str = "vit_base_patch16"
    """Encoder: vit_{tiny,small,base,large,huge}_patch{14,16} (any patch size that divides image_size)."""
    image_size: int = 224
    """Side of the square input in pixels."""
    grad_checkpointing: bool = False
    """Recompute each transformer block in the backward pass (non-reentrant) to save activation memory."""
    drop_path_rate: float = 0.0
    """Stochastic depth, linearly increasing over depth (MAE pretraining uses 0)."""
    init_from: str = ""
    """Start a new run from released weights: a timm state dict (.safetensors, .pth/.bin) or timm directory, an
    MAE checkpoint (with its decoder, if it has one) or a DINO checkpoint (its student's backbone and head). What
    the file lacks starts fresh, what this run cannot use is ignored; start-up says which. Not read when the run
    resumes from its own checkpoint."""
    freeze_encoder_steps: int | None = 0
    """With init_from: the encoder keeps the loaded weights (lr and weight decay 0) for the first N optimizer
    steps while the fresh parts (a decoder, a head) learn; then it trains too, with a fresh AdamW state, under
    the same schedule. Or freeze_encoder_epochs."""
    freeze_encoder_epochs: float | None = None
    compile: bool = False
    """torch.compile each transformer block (inductor; the first steps pay the compilation, about a minute; ZeRO
    0-2). Off until a GPU measurement says it helps (benchmarks/gpu_checks.sh times both)."""

    def validate(self, prefix: str = "model") -> None:
        match = MODEL_NAME.match(self.name)
        valid = ", ".join(f"vit_{s}_patch16" for s in VIT_SIZES)
        require(match is not None and match["size"] in VIT_SIZES, f"{prefix}.name",
                f"unknown model '{self.name}' (choose one of {valid}, or patch14 variants)")
        patch = int(match["patch"])
        require(0 < patch <= self.image_size <= MAX_IMAGE_SIZE, f"{prefix}.image_size",
                f"{self.image_size} must be in [{patch}, {MAX_IMAGE_SIZE}] (the patch size {patch} to "
                f"{MAX_IMAGE_SIZE} pixels)")
        require(self.image_size % patch == 0, f"{prefix}.image_size",
                f"{self.image_size} is not a multiple of the patch size {patch}")
        require(0.0 <= self.drop_path_rate < 1.0, f"{prefix}.drop_path_rate", "must be in [0, 1)")
        check_pair(self, prefix, "freeze_encoder_epochs", "freeze_encoder_steps")
        require(self.freeze_encoder_steps is None or self.freeze_encoder_steps >= 0, f"{prefix}.freeze_encoder_steps",
                "must be >= 0")
        require(bool(self.init_from) or not (self.freeze_encoder_steps or self.freeze_encoder_epochs),
                f"{prefix}.freeze_encoder_steps", "keeps an encoder loaded by model.init_from; set model.init_from "
                "(a random encoder has nothing to keep)")

    @property
    def patch_size(self) -> int:
        return int(MODEL_NAME.match(self.name)["patch"])

    @property
    def dims(self) -> tuple[int, int, int]:
        """(width, depth, heads)."""
        return VIT_SIZES[MODEL_NAME.match(self.name)["size"]]

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2
