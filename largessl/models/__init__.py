"""What the encoder is. Single-device PyTorch; nothing here imports deepspeed."""

from largessl.models.config import VIT_SIZES, ModelConfig
from largessl.models.vit import ViTEncoder, build_blocks, init_mae_style, run_blocks

__all__ = ["VIT_SIZES", "ModelConfig", "ViTEncoder", "build_blocks", "init_mae_style", "run_blocks"]
