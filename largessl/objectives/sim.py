"""SIM: Siamese image modeling with the UniGrad loss (methods.md section 5).

Online branch, on view 1 with its block mask: the frozen patch embedding (outside the optimizer, at its random
init) -> the encoder on [cls] + the visible patches, with no final LayerNorm -> the projector (Linear D -> Dd and
2 blocks whose norms are batch norm over tokens, synchronised across ranks) -> the predictor on

    [cls + 0] + [visible tokens + view 1's absolute table] + [mask token + Linear(relative table) per view-2 patch]

(4 batch-norm blocks and a Linear), whose last N outputs predict view 2's tokens. Target branch, an EMA of the
encoder ([cls] token and blocks) and the projector, on the full view 2, [cls] dropped. The loss is UniGrad's
(5.3), in fp32, on the LayerNorm-ed (no affine) targets:

    loss = (mean_n |p_n - t_n|^2 + lambda mean_n p_n^T C p_n) / Dd,   C = mean over ranks of T^T T / n

computed as ((P C) * P).sum(-1), not as the diagonal of the n x n matrix P C P^T the released code forms.

Deviations from the released code (also in docs/design-notes.md):
- the target reads the online patch embedding instead of an EMA copy of it (both are frozen at the same
  init, so the copy is that constant);
- the EMA update runs after each optimizer step with the momentum the released code uses before the next
  one (m at step + 1); its update at step 0, which would average two equal copies, is not made;
- the target's fp32 EMA state comes from the student's fp32 masters (distributed/ema.py); BN running
  statistics are not EMA-ed (as released) and are kept in fp32 outside DeepSpeed's buffers;
- the batch norm's output is cast back to the compute dtype (bf16 under bf16); LayerNorms run in that dtype;
- loss_form=global_dense and correlation=ema are options beyond the release (design.md), not its defaults.

Reference: https://github.com/OpenGVLab/Siamese-Image-Modeling/blob/main/models_sim.py (forward_sim,
compute_unigrad_loss, mm_update); https://github.com/fundamentalvision/UniGrad (loss_unigrad: the EMA of F).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from largessl.data.gpu_views import SIMEncodedTransform, sim_device_views
from largessl.data.siamese import SIMTransform
from largessl.distributed import comm
from largessl.models import flops
from largessl.models.batchnorm import TokenSyncBatchNorm, load_norm_state, norm_state
from largessl.models.config import ModelConfig
from largessl.models.flops import Flops
from largessl.models.pos_embed import sincos_2d, sincos_relative
from largessl.models.vit import ViTEncoder, build_blocks, init_mae_style, run_blocks
from largessl.objectives.base import Objective, SampleTransform
from largessl.objectives.cae import gather_tokens, split_by_mask
from largessl.objectives.config import SIMConfig
from largessl.optim.schedules import cosine


def bn_blocks(width: int, depth: int, heads: int) -> nn.ModuleList:
    """Pre-norm blocks (qkv bias, MLP x4) whose two norms are token batch norms (SIM's use_proj_ln=False)."""
    return nn.ModuleList(Block(width, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=TokenSyncBatchNorm)
                         for _ in range(depth))


def unigrad_loss(pred: torch.Tensor, target: torch.Tensor, correlation: torch.Tensor,
                 neg_weight: float) -> dict[str, torch.Tensor]:
    """UniGrad on rows of pred and target [n, Dd] (target normed, no grad) with the target correlation [Dd, Dd]:
    loss = pos + neg_weight x neg, where pos = mean |p - t|^2 / Dd and neg = mean p^T C p / Dd."""
    dim = pred.shape[-1]
    pos = ((pred - target) ** 2).sum(dim=-1).mean() / dim
    neg = ((pred @ correlation) * pred).sum(dim=-1).mean() / dim
    return {"loss": pos + neg_weight * neg, "pos": pos.detach(), "neg": neg.detach()}


class TargetCorrelation:
    """C of the negative term: the current batch's (mean over ranks of T^T T / n), or UniGrad's EMA of it.

    With the EMA, each micro-batch's loss uses rho F + (1 - rho) C_batch, and F becomes rho F + (1 - rho) x the mean
    C_batch of the step's micro-batches once per optimizer step (`commit`): with one micro-batch per step that is
    UniGrad's update-then-use. F starts as the first C_batch, as in UniGrad."""

    def __init__(self, mode: str, momentum: float) -> None:
        self.mode, self.momentum = mode, momentum
        self.ema: torch.Tensor | None = None
        self.pending: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, targets: torch.Tensor) -> torch.Tensor:
        batch = comm.all_reduce_mean(targets.T @ targets / targets.shape[0])
        if self.mode == "batch":
            return batch
        self.pending.append(batch)
        if self.ema is None:
            return batch
        return self.momentum * self.ema.to(batch.device) + (1 - self.momentum) * batch

    def commit(self) -> None:
        """Once per optimizer step: fold the step's batch correlations into the EMA."""
        if not self.pending:
            return
        batch = torch.stack(self.pending).mean(dim=0)
        self.pending = []
        if self.ema is None:
            self.ema = batch
        else:
            self.ema = self.momentum * self.ema.to(batch.device) + (1 - self.momentum) * batch


class Projector(nn.Module):
    """Linear(D -> Dd), then batch-norm blocks (both branches)."""

    def __init__(self, dim: int, width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, width)
        self.blocks = bn_blocks(width, depth, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.blocks, self.embed(x), grad_checkpointing=False)


class Predictor(nn.Module):
    """View 1's projected [cls] and visible tokens with their absolute positions, plus one mask-token query per
    patch of view 2 at its relative position (methods.md 5.1.4) -> batch-norm blocks -> Linear; the queries' outputs."""

    def __init__(self, width: int, depth: int, heads: int, grid_size: int) -> None:
        super().__init__()
        self.width, self.grid_size = width, grid_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_mlp = nn.Linear(2 * width, width)  # the released decoder_pos_mlp
        self.blocks = bn_blocks(width, depth, heads)
        self.head = nn.Linear(width, width)  # the released decoder_pred
        table = sincos_2d(width, grid_size, rows_first=True)  # SIM's layout, zero row for [cls]
        self.register_buffer("pos_embed", table[None], persistent=False)

    def forward(self, projected: torch.Tensor, visible: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """projected [B, 1 + V, Dd], visible patch indices [B, V], geometry [B, 6] -> predictions [B, N, Dd]."""
        dtype = projected.dtype
        pos = self.pos_embed.to(dtype)
        relative = sincos_relative(self.width, self.grid_size, geometry).to(dtype)
        queries = self.mask_token.to(dtype) + self.pos_mlp(relative)
        x = torch.cat([projected[:, :1] + pos[:, :1], projected[:, 1:] + gather_tokens(pos[:, 1:], visible), queries],
                      dim=1)
        x = run_blocks(self.blocks, x, grad_checkpointing=False)
        return self.head(x[:, -queries.shape[1]:])


class TargetBranch(nn.Module):
    """The momentum encoder ([cls] token and blocks) and projector; parameters frozen, set by the EMA teacher."""

    def __init__(self, dim: int, depth: int, heads: int, projector: tuple[int, int, int]) -> None:
        """`projector`: (width, depth, heads) of the projector."""
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = build_blocks(dim, depth, heads)
        self.projector = Projector(dim, *projector)
        self.requires_grad_(False)

    def forward(self, tokens: torch.Tensor, cls_position: torch.Tensor) -> torch.Tensor:
        """Embedded patches of view 2 with positions [B, N, D] -> target tokens [B, N, Dd] ([cls] dropped)."""
        cls = (self.cls_token + cls_position.to(self.cls_token.dtype)).expand(tokens.shape[0], -1, -1)
        x = run_blocks(self.blocks, torch.cat([cls.to(tokens.dtype), tokens], dim=1), grad_checkpointing=False)
        return self.projector(x)[:, 1:]


class SIM(Objective):
    name = "sim"
    Config = SIMConfig

    def __init__(self, cfg: SIMConfig, model_cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg, self.num_masked = cfg, cfg.masked_count(model_cfg)
        self.encoder = ViTEncoder.from_config(model_cfg, **self.encoder_layout(cfg))
        self.encoder.patch_embed.requires_grad_(False)  # frozen at its random init (SIM's train_patch_embed=False)
        dim, depth, heads = model_cfg.dims
        width = cfg.width(model_cfg)
        self.projector = Projector(dim, width, cfg.projector_depth, cfg.decoder_heads)
        self.predictor = Predictor(width, cfg.predictor_depth, cfg.decoder_heads, self.encoder.grid_size)
        self.projector.apply(init_mae_style)
        self.predictor.apply(init_mae_style)
        # equal to the online branch from step 0 on: EMATeacher.initialize copies it
        self.target = TargetBranch(dim, depth, heads, (width, cfg.projector_depth, cfg.decoder_heads))
        self.correlations = {form: TargetCorrelation(cfg.correlation, cfg.correlation_momentum)
                             for form in ("dense", "global")}
        self.step, self.total_steps = 0, 1

    @classmethod
    def encoder_layout(cls, cfg: SIMConfig) -> dict[str, Any]:
        return {"pos_embed": "sincos_rows_first", "init": "mae", "final_norm": False}

    @classmethod
    def sample_transform(cls, cfg: SIMConfig, model_cfg: ModelConfig) -> SampleTransform:
        return SIMTransform(model_cfg.image_size, model_cfg.image_size // model_cfg.patch_size,
                            cfg.masked_count(model_cfg), crop_scale=cfg.crop_scale,
                            min_num_patches=cfg.min_block_patches)

    @classmethod
    def encoded_views(cls, cfg: SIMConfig, model_cfg: ModelConfig) -> tuple[Callable, Callable]:
        return (SIMEncodedTransform(model_cfg.image_size // model_cfg.patch_size, cfg.masked_count(model_cfg),
                                    crop_scale=cfg.crop_scale, min_num_patches=cfg.min_block_patches),
                sim_device_views(model_cfg.image_size))

    # ----------------------------------------------------------------- what the trainer asks

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"predictor.mask_token"}

    def flops_per_image(self) -> Flops:
        """Online: encoder on view 1's visible tokens and [cls] (its patch embedding frozen: no gradients),
        projector, predictor on [cls] + visible + N queries, the loss's P @ C; target branch on all of view 2."""
        n, visible = self.encoder.num_patches, self.encoder.num_patches - self.num_masked + 1
        embed = flops.patch_embed(n, self.encoder.patch_size, self.encoder.dim)
        width = self.predictor.width
        projector = flops.per_token(self.projector.embed) * visible + flops.blocks(self.projector.blocks, visible)
        predictor = (flops.per_token(self.predictor.pos_mlp) * n + flops.blocks(self.predictor.blocks, visible + n)
                     + flops.per_token(self.predictor.head) * n)
        loss = flops.linear(n, width, width) * (2 if self.cfg.loss_form == "global_dense" else 1)
        trained = flops.blocks(self.encoder.blocks, visible) + projector + predictor + loss
        target = (embed + flops.blocks(self.target.blocks, n + 1) + flops.per_token(self.target.projector.embed)
                  * (n + 1) + flops.blocks(self.target.projector.blocks, n + 1))
        return Flops(trained, no_grad=embed + target)

    def teacher_pairs(self) -> list[tuple[str, str]]:
        online = {"cls_token": "encoder.cls_token"}
        online.update({f"blocks.{n}": f"encoder.blocks.{n}" for n, _ in self.encoder.blocks.named_parameters()})
        online.update({f"projector.{n}": f"projector.{n}" for n, _ in self.projector.named_parameters()})
        names = [name for name, _ in self.target.named_parameters()]
        assert sorted(names) == sorted(online), "the target branch must mirror the online encoder and projector"
        return [(f"target.{name}", online[name]) for name in names]

    def teacher_momentum(self) -> float:
        # the released code updates before the next step's forward with that step's momentum
        return cosine(self.step + 1, start=self.cfg.teacher_momentum, end=self.cfg.teacher_momentum_end,
                      total_steps=self.total_steps)

    def extra_state(self) -> dict[str, torch.Tensor]:
        state = norm_state(self)
        for form, correlation in self.correlations.items():
            if correlation.ema is not None:
                state[f"correlation.{form}"] = correlation.ema.cpu()
        return state

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        load_norm_state(self, state)
        for form, correlation in self.correlations.items():
            saved = state.get(f"correlation.{form}")
            correlation.ema = None if saved is None else saved.float()

    # ----------------------------------------------------------------- the step

    def begin_step(self, step: int, total_steps: int) -> None:
        self.step, self.total_steps = step, total_steps

    def after_optimizer_step(self, step: int) -> None:
        for correlation in self.correlations.values():
            correlation.commit()

    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The online branch: predictions of view 2's target tokens [B, N, Dd]."""
        visible, _ = split_by_mask(batch["mask"], self.num_masked)
        encoded = self.encoder(batch["view1"].to(self.compute_dtype()), keep_idx=visible)
        return self.predictor(self.projector(encoded), visible, batch["geometry"])

    @torch.no_grad()
    def targets(self, view2: torch.Tensor) -> torch.Tensor:
        """The target branch on the whole view 2: [B, N, Dd], before the target norm."""
        tokens, cls_position = self.encoder.embed_patches(view2.to(self.compute_dtype()))
        return self.target(tokens, cls_position)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.predict(batch).float()
        target = self.targets(batch["view2"]).float()
        width = pred.shape[-1]
        normed = F.layer_norm(target, (width,)).flatten(0, 1)  # the released teacher_norm: no affine, eps 1e-5
        dense = unigrad_loss(pred.flatten(0, 1), normed, self.correlations["dense"](normed), self.cfg.neg_weight)
        out = {"loss_dense": dense["loss"].detach(), "dense_pos": dense["pos"], "dense_neg": dense["neg"],
               "teacher_momentum": pred.new_tensor(self.teacher_momentum())}
        if self.cfg.loss_form == "dense":
            return {"loss": dense["loss"], **out}
        pooled_target = F.layer_norm(target.mean(dim=1), (width,))
        global_ = unigrad_loss(pred.mean(dim=1), pooled_target, self.correlations["global"](pooled_target),
                               self.cfg.neg_weight)
        loss = self.cfg.alpha1 * global_["loss"] + self.cfg.alpha2 * dense["loss"]
        return {"loss": loss, **out, "loss_global": global_["loss"].detach(), "global_pos": global_["pos"],
                "global_neg": global_["neg"]}
