"""The objectives' config sections (`objective.*`), one dataclass per method, selected by `objective.name`.

Torch-free, like every config module, so a config is loaded and checked before torch is imported. Each
method's module (mae.py, dino.py) holds the objective itself and names its config as `Config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from largessl.config.loader import check_scale_range, require
from largessl.data.masking import check_mask_count
from largessl.epochs import check_pair
from largessl.models.config import ModelConfig


@dataclass
class MAEConfig:
    """MAE (objective.name=mae): masking, decoder, loss target, crops."""

    name: str = "mae"
    """Objective name (selects this config section)."""
    mask_ratio: float = 0.75
    """Fraction of patches removed per image; the encoder sees int(N x (1 - mask_ratio)) patches."""
    norm_pix_loss: bool = True
    """Regress per-patch normalised pixels (all released MAE checkpoints use it)."""
    decoder_dim: int = 512
    """Decoder width."""
    decoder_depth: int = 8
    """Decoder transformer blocks."""
    decoder_heads: int = 16
    """Decoder attention heads."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range."""

    def validate(self, prefix: str = "objective") -> None:
        require(0.0 < self.mask_ratio < 1.0, f"{prefix}.mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")
        require(self.decoder_depth > 0, f"{prefix}.decoder_depth", "must be > 0")
        require(self.decoder_heads > 0 and self.decoder_dim % self.decoder_heads == 0, f"{prefix}.decoder_heads",
                f"must divide decoder_dim ({self.decoder_dim})")
        require(self.decoder_dim % 4 == 0, f"{prefix}.decoder_dim", "must be a multiple of 4 (sin-cos positions)")
        check_scale_range(self.crop_scale, f"{prefix}.crop_scale")

    def validate_with_model(self, model: ModelConfig) -> None:
        keep = num_visible(model.num_patches, self.mask_ratio)
        require(0 < keep < model.num_patches, "objective.mask_ratio",
                f"{self.mask_ratio} leaves {keep} of {model.num_patches} patches visible; need at least one "
                "visible and one masked")


def num_visible(num_patches: int, mask_ratio: float) -> int:
    return int(num_patches * (1 - mask_ratio))


@dataclass
class DINOConfig:
    """DINO (objective.name=dino): head, multi-crop, temperatures, centering, teacher momentum."""

    name: str = "dino"
    """Objective name (selects this config section)."""
    out_dim: int = 65536
    """K, the number of prototypes (all official recipes use 65536)."""
    hidden_dim: int = 2048
    """Width of the head's MLP."""
    bottleneck_dim: int = 256
    """Width of the L2-normalised bottleneck before the last layer."""
    norm_last_layer: bool = True
    """Keep the last layer's rows at unit norm (frozen weight_g); false learns them (official ViT-S 'boost' only)."""
    freeze_last_layer_steps: int | None = 0
    """Optimizer steps at the start during which the last layer does not move (official: 1 epoch)."""
    freeze_last_layer_epochs: float | None = None
    """The same in epochs, instead of freeze_last_layer_steps."""
    local_crops: int = 8
    """Local crops per image (0 disables multi-crop)."""
    local_crop_size: int = 96
    """Side of the local crops in pixels (the global crops are model.image_size)."""
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    """RandomResizedCrop area range of the two global crops."""
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    """RandomResizedCrop area range of the local crops."""
    student_temp: float = 0.1
    """Student softmax temperature."""
    teacher_temp: float = 0.07
    """Teacher softmax temperature after its warmup ("anything above 0.07 is unstable", official help)."""
    warmup_teacher_temp: float = 0.04
    """Teacher temperature at step 0."""
    warmup_teacher_temp_steps: int | None = 0
    """Steps of linear teacher-temperature warmup (paper: 30 epochs for ViT-S/16, VISSL: 50 for ViT-B/16)."""
    warmup_teacher_temp_epochs: float | None = None
    """The same in epochs, instead of warmup_teacher_temp_steps."""
    center_momentum: float = 0.9
    """c <- m c + (1 - m) mean teacher output, once per optimizer step."""
    teacher_momentum: float = 0.996
    """EMA momentum at step 0; follows a cosine to teacher_momentum_end at the last step."""
    teacher_momentum_end: float = 1.0
    """EMA momentum at the last step."""

    def validate(self, prefix: str = "objective") -> None:
        for key in ("out_dim", "hidden_dim", "bottleneck_dim", "local_crop_size"):
            require(getattr(self, key) > 0, f"{prefix}.{key}", "must be > 0")
        require(self.local_crops >= 0, f"{prefix}.local_crops", "must be >= 0")
        for epochs, steps in (("freeze_last_layer_epochs", "freeze_last_layer_steps"),
                              ("warmup_teacher_temp_epochs", "warmup_teacher_temp_steps")):
            check_pair(self, prefix, epochs, steps)
            require((getattr(self, steps) or 0) >= 0, f"{prefix}.{steps}", "must be >= 0")
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            require(getattr(self, key) > 0, f"{prefix}.{key}", "must be > 0")
        for key in ("center_momentum", "teacher_momentum", "teacher_momentum_end"):
            require(0 <= getattr(self, key) <= 1, f"{prefix}.{key}", "must be in [0, 1]")
        for key in ("global_crop_scale", "local_crop_scale"):
            check_scale_range(getattr(self, key), f"{prefix}.{key}")

    def validate_with_model(self, model: ModelConfig) -> None:
        require(self.local_crop_size % model.patch_size == 0, "objective.local_crop_size",
                f"{self.local_crop_size} is not a multiple of the patch size {model.patch_size}")
        require(self.local_crop_size <= model.image_size, "objective.local_crop_size",
                f"{self.local_crop_size} is larger than the global crops (model.image_size {model.image_size})")


CAE_TARGETS = ("pixels", "dalle")


@dataclass
class CAEConfig:
    """CAE (objective.name=cae): block masks, latent regressor, alignment, decoder, pixel or DALL-E token target."""

    name: str = "cae"
    """Objective name (selects this config section)."""
    num_masked: int = 0
    """Patches masked per image, exactly (block-wise masks); 0: half of them (98 of 196, 128 of 256)."""
    min_block_patches: int = 16
    """Smallest block the mask generator places (BEiT's min_num_patches; CAE passes 16)."""
    target: str = "pixels"
    """'pixels': normalised-pixel MSE on the masked patches (the CAE paper's RGB ablation); 'dalle': DALL-E dVAE
    token ids of the same crop at 8 px per patch (the official target; needs objective.tokenizer_path)."""
    tokenizer_path: str = ""
    """The DALL-E dVAE encoder file (the official encoder.pkl), for target=dalle. It is a pickle: trusted files
    only."""
    norm_pix_loss: bool = True
    """target=pixels: regress per-patch normalised pixels."""
    align_weight: float = 2.0
    """lambda: loss = main + lambda x MSE(predicted latents, encoder latents of the masked patches)."""
    target_drop_path: bool = True
    """Compute the alignment targets with drop path active, as the official code does (its alignment encoder is
    in train mode); false: targets without drop path."""
    regressor_depth: int = 4
    """Cross-attention blocks of the latent contextual regressor."""
    decoder_depth: int = 4
    """Blocks of the decoder over the masked positions."""
    decoder_dim: int = 0
    """Width of regressor and decoder; 0: the encoder's (a Linear + LayerNorm projects when they differ)."""
    decoder_heads: int = 0
    """Attention heads of regressor and decoder; 0: the encoder's."""
    layer_scale: float = 0.1
    """Initial layer-scale gammas of the encoder blocks (CAE: 0.1 for ViT-B, 1e-5 for ViT-L)."""
    decoder_layer_scale: float = 0.1
    """Initial layer-scale gammas of the regressor and decoder blocks."""
    fix_init_weight: bool = False
    """Keep BEiT's init (trunc-normal + rescale); false re-initialises every Linear xavier-uniform, as the official
    base runs do (the large run meant to pass --fix_init_weight)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range."""

    def validate(self, prefix: str = "objective") -> None:
        require(self.target in CAE_TARGETS, f"{prefix}.target", f"must be one of {', '.join(CAE_TARGETS)}")
        require(self.target != "dalle" or bool(self.tokenizer_path), f"{prefix}.tokenizer_path",
                "is required for objective.target=dalle: the DALL-E dVAE encoder file (encoder.pkl)")
        require(self.min_block_patches >= 1, f"{prefix}.min_block_patches", "must be >= 1")
        require(self.align_weight >= 0, f"{prefix}.align_weight", "must be >= 0")
        for key in ("regressor_depth", "decoder_depth"):
            require(getattr(self, key) > 0, f"{prefix}.{key}", "must be > 0")
        for key in ("decoder_dim", "decoder_heads"):
            require(getattr(self, key) >= 0, f"{prefix}.{key}", "must be >= 0 (0: the encoder's)")
        require(self.layer_scale > 0 and self.decoder_layer_scale > 0, f"{prefix}.layer_scale",
                "layer_scale and decoder_layer_scale must be > 0")
        check_scale_range(self.crop_scale, f"{prefix}.crop_scale")

    def masked_count(self, model: ModelConfig) -> int:
        return self.num_masked or model.num_patches // 2

    def widths(self, model: ModelConfig) -> tuple[int, int]:
        """(regressor/decoder width, heads)."""
        dim, _, heads = model.dims
        return self.decoder_dim or dim, self.decoder_heads or heads

    def validate_with_model(self, model: ModelConfig) -> None:
        check_mask_count("objective.num_masked", self.masked_count(model), model.num_patches, self.min_block_patches)
        dim, heads = self.widths(model)
        require(dim % heads == 0, "objective.decoder_heads", f"{heads} heads do not divide the width {dim}")
        require(dim % 4 == 0, "objective.decoder_dim", f"{dim} is not a multiple of 4 (sin-cos positions)")

    def input_files(self) -> dict[str, str]:
        """Files the run reads besides datasets (checked before it starts): key -> path."""
        return {"objective.tokenizer_path": self.tokenizer_path} if self.target == "dalle" else {}


SIM_LOSS_FORMS = ("dense", "global_dense")
SIM_CORRELATIONS = ("batch", "ema")


@dataclass
class SIMConfig:
    """SIM (objective.name=sim): two views with their relative geometry, block mask, BN projector and predictor,
    EMA target, UniGrad loss."""

    name: str = "sim"
    """Objective name (selects this config section)."""
    num_masked: int = 0
    """Patches of view 1 masked per image, exactly (block-wise, topped up at random); 0: 60% (118 of 196, 154 of
    256)."""
    min_block_patches: int = 16
    """Smallest block the mask generator places (SIM passes 16)."""
    decoder_dim: int = 0
    """Width of projector and predictor, Dd; 0: the encoder's (the ViT-B reference run uses 768)."""
    decoder_heads: int = 16
    """Attention heads of projector and predictor."""
    projector_depth: int = 2
    """Blocks (with batch norm) after the Linear(D -> Dd) of the projector, in both branches."""
    predictor_depth: int = 4
    """Blocks (with batch norm) of the predictor."""
    neg_weight: float = 0.02
    """lambda of UniGrad: loss = (positive + lambda x negative) / Dd."""
    loss_form: str = "dense"
    """'dense': the released loss, every token of view 2 a sample; 'global_dense': alpha1 x the same loss on the
    mean-pooled tokens + alpha2 x the dense loss (the SIM write-up's form)."""
    alpha1: float = 1.0
    """Weight of the global term (loss_form=global_dense)."""
    alpha2: float = 4.0
    """Weight of the dense term (loss_form=global_dense)."""
    correlation: str = "batch"
    """The negative term's target correlation: 'batch', of the current micro-batch over all ranks (released SIM);
    'ema', an EMA of it updated once per optimizer step (UniGrad), saved in checkpoints."""
    correlation_momentum: float = 0.99
    """rho of correlation=ema: F <- rho F + (1 - rho) F_batch."""
    teacher_momentum: float = 0.995
    """EMA momentum of the target branch at step 0; follows a cosine to teacher_momentum_end."""
    teacher_momentum_end: float = 1.0
    """EMA momentum at the last step."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range of both views (the reference run's --crop_min 0.08)."""

    def validate(self, prefix: str = "objective") -> None:
        require(self.loss_form in SIM_LOSS_FORMS, f"{prefix}.loss_form", f"must be one of {', '.join(SIM_LOSS_FORMS)}")
        require(self.correlation in SIM_CORRELATIONS, f"{prefix}.correlation",
                f"must be one of {', '.join(SIM_CORRELATIONS)}")
        require(self.min_block_patches >= 1, f"{prefix}.min_block_patches", "must be >= 1")
        require(self.num_masked >= 0, f"{prefix}.num_masked", "must be >= 0 (0: 60% of the patches)")
        for key in ("decoder_heads", "predictor_depth"):
            require(getattr(self, key) > 0, f"{prefix}.{key}", "must be > 0")
        for key in ("decoder_dim", "projector_depth"):
            require(getattr(self, key) >= 0, f"{prefix}.{key}", "must be >= 0")
        for key in ("neg_weight", "alpha1", "alpha2"):
            require(getattr(self, key) >= 0, f"{prefix}.{key}", "must be >= 0")
        for key in ("correlation_momentum", "teacher_momentum", "teacher_momentum_end"):
            require(0 <= getattr(self, key) <= 1, f"{prefix}.{key}", "must be in [0, 1]")
        check_scale_range(self.crop_scale, f"{prefix}.crop_scale")

    def masked_count(self, model: ModelConfig) -> int:
        return self.num_masked or round(0.6 * model.num_patches)

    def width(self, model: ModelConfig) -> int:
        """Dd, the projector's and predictor's width."""
        return self.decoder_dim or model.dims[0]

    def validate_with_model(self, model: ModelConfig) -> None:
        check_mask_count("objective.num_masked", self.masked_count(model), model.num_patches, self.min_block_patches)
        dim = self.width(model)
        require(dim % self.decoder_heads == 0, "objective.decoder_heads",
                f"{self.decoder_heads} heads do not divide the width {dim}")
        require(dim % 4 == 0, "objective.decoder_dim", f"{dim} is not a multiple of 4 (sin-cos positions)")


PRETRAINING_CONFIGS: dict[str, type] = {"mae": MAEConfig, "dino": DINOConfig, "cae": CAEConfig, "sim": SIMConfig}


def _all_configs() -> dict[str, type]:
    """The pretraining methods and the evaluation protocols (largessl/eval), which run as objectives too."""
    from largessl.eval.protocol_config import PROTOCOL_CONFIGS

    return {**PRETRAINING_CONFIGS, **PROTOCOL_CONFIGS}


OBJECTIVE_CONFIGS: dict[str, type] = _all_configs()
