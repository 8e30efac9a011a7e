"""DINO: self-distillation with no labels (methods.md section 3).

A student (ViT with learned positions + DINO head) sees 2 global and N local crops; an EMA teacher of the same
architecture sees the 2 global crops. The student matches the teacher's centred, sharpened distribution over K
prototypes for every (teacher view, other student view) pair. Per optimizer step, not per micro-batch: the
teacher temperature, weight decay and EMA momentum schedules advance, the center moves towards the mean teacher
output of the whole effective batch (all-reduced over ranks), and the teacher is updated (distributed/ema.py,
in fp32 whatever the training precision).

Deviations from the official code, also listed in docs/design-notes.md:
- gradient clipping is global-norm through DeepSpeed (the official clips each parameter's gradient to 3.0);
- the last layer is "frozen" for its first steps by lr 0 and weight decay 0 in its own parameter group, whose
  AdamW state is reset when the freeze ends (the official drops its gradients); its gradient still counts in
  the global clipping norm;
- the teacher temperature warms up per optimizer step (the official: per epoch);
- position embeddings are resampled for local crops with timm's bicubic resample (the official adds 0.1 to the
  scale factor);
- schedules are in optimizer steps; the recipes give their epoch equivalents.

Reference: https://github.com/facebookresearch/dino/blob/main/main_dino.py (DINOLoss, MultiCropWrapper)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from largessl.data.gpu_views import DINOEncodedTransform, dino_device_views
from largessl.data.multicrop import MultiCropTransform
from largessl.distributed import comm
from largessl.models import flops
from largessl.models.config import ModelConfig
from largessl.models.dino_head import DINOHead
from largessl.models.flops import Flops
from largessl.models.vit import ViTEncoder
from largessl.objectives.base import Objective, SampleTransform
from largessl.objectives.config import DINOConfig
from largessl.optim.schedules import cosine, linear_warmup

LAST_LAYER = "student.head.last_layer."


def dino_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor, *,
              student_temp: float, teacher_temp: float, num_views: int) -> dict[str, torch.Tensor]:
    """Cross-entropy between the centred, sharpened teacher and the student over all pairs of different views.

    student_logits [V*B, K] (views in order: 2 global, then local), teacher_logits [2*B, K] (the 2 global views),
    center [1, K]; all fp32. Returns the loss, the mean teacher entropy and KL(teacher || student) (the loss
    minus that entropy): a uniform collapse pins the entropy at ln K, a one-hot collapse drives it to 0.
    """
    log_student = F.log_softmax(student_logits / student_temp, dim=-1).chunk(num_views)
    teacher = F.softmax((teacher_logits - center) / teacher_temp, dim=-1).detach()
    targets = teacher.chunk(2)
    total, pairs = student_logits.new_zeros(()), 0
    for t, target in enumerate(targets):
        for v, log_p in enumerate(log_student):
            if v != t:  # the student and teacher saw the same view
                total = total + (-(target * log_p).sum(dim=-1)).mean()
                pairs += 1
    loss = total / pairs
    entropy = -torch.xlogy(teacher, teacher).sum(dim=-1).mean()  # each teacher view is in the same number of pairs
    return {"loss": loss, "teacher_entropy": entropy.detach(), "kl_teacher_student": (loss - entropy).detach()}


def updated_center(center: torch.Tensor, teacher_sum: torch.Tensor, count: torch.Tensor,
                   momentum: float) -> torch.Tensor:
    """c m + (1 - m) (sum of teacher outputs over all ranks / their number): the official update over the
    whole effective batch."""
    totals = comm.all_reduce_sum(torch.cat([teacher_sum, count.reshape(1)]))
    return center * momentum + totals[:-1] / totals[-1] * (1 - momentum)


class MultiCropNetwork(nn.Module):
    """Backbone once per crop resolution, then the head once over all [cls] features (MultiCropWrapper)."""

    def __init__(self, backbone: ViTEncoder, head: DINOHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return self.head(torch.cat([self.backbone(x)[:, 0] for x in crops if x.numel()]))


class DINO(Objective):
    name = "dino"
    Config = DINOConfig

    def __init__(self, cfg: DINOConfig, model_cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = self._network(cfg, model_cfg, drop_path_rate=model_cfg.drop_path_rate)
        self.teacher = self._network(cfg, model_cfg, drop_path_rate=0.0)  # the official teacher has no drop path
        self.teacher.requires_grad_(False)  # it follows the student by EMA (distributed/ema.py)
        # Kept outside the module's buffers: DeepSpeed would cast a buffer to bf16; the center stays fp32.
        self.center = torch.zeros(1, cfg.out_dim)
        self.teacher_sum = torch.zeros(cfg.out_dim)
        self.teacher_count = torch.zeros(())
        self.step, self.total_steps = 0, 1

    @classmethod
    def encoder_layout(cls, cfg: DINOConfig) -> dict[str, Any]:
        return {"pos_embed": "learned", "init": "dino"}

    @staticmethod
    def _network(cfg: DINOConfig, model_cfg: ModelConfig, drop_path_rate: float) -> MultiCropNetwork:
        backbone = ViTEncoder.from_config(model_cfg, drop_path_rate=drop_path_rate, **DINO.encoder_layout(cfg))
        head = DINOHead(backbone.dim, cfg.out_dim, hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim,
                        norm_last_layer=cfg.norm_last_layer)
        return MultiCropNetwork(backbone, head)

    @classmethod
    def sample_transform(cls, cfg: DINOConfig, model_cfg: ModelConfig) -> SampleTransform:
        return MultiCropTransform(global_size=model_cfg.image_size, local_size=cfg.local_crop_size,
                                  num_local=cfg.local_crops, global_scale=cfg.global_crop_scale,
                                  local_scale=cfg.local_crop_scale)

    @classmethod
    def encoded_views(cls, cfg: DINOConfig, model_cfg: ModelConfig) -> tuple[Callable, Callable]:
        return (DINOEncodedTransform(global_size=model_cfg.image_size, local_size=cfg.local_crop_size,
                                     num_local=cfg.local_crops, global_scale=cfg.global_crop_scale,
                                     local_scale=cfg.local_crop_scale),
                dino_device_views(model_cfg.image_size, cfg.local_crop_size))

    # ----------------------------------------------------------------- what the trainer asks

    def eval_encoder(self) -> ViTEncoder:
        return self.teacher.backbone  # methods.md 3.6: evaluate the teacher

    def trained_encoder(self) -> ViTEncoder:
        return self.student.backbone

    def compute_dtype(self) -> torch.dtype:
        return self.student.backbone.patch_embed.proj.weight.dtype

    def no_weight_decay(self) -> set[str]:
        return set()  # as the official groups: only biases and 1-D parameters are exempt (pos_embed, cls decayed)

    def frozen_at_start(self) -> dict[str, int]:
        return {LAST_LAYER: self.cfg.freeze_last_layer_steps}

    def flops_per_image(self) -> Flops:
        """Student on the 2 global and the local crops, teacher on the 2 global ones, each crop's [cls] through
        the head."""
        net, patch = self.student.backbone, self.student.backbone.patch_size
        crops = [(net.num_patches, 2), ((self.cfg.local_crop_size // patch) ** 2, self.cfg.local_crops)]
        per_crop = {n: flops.encoder(net, n + 1, n) + flops.per_token(self.student.head) for n, _ in crops}
        return Flops(trained=sum(per_crop[n] * count for n, count in crops), no_grad=2 * per_crop[net.num_patches])

    def teacher_pairs(self) -> list[tuple[str, str]]:
        return [(f"teacher.{name}", f"student.{name}") for name, _ in self.teacher.named_parameters()]

    def teacher_momentum(self) -> float:
        return cosine(self.step, start=self.cfg.teacher_momentum, end=self.cfg.teacher_momentum_end,
                      total_steps=self.total_steps)

    def teacher_temp(self) -> float:
        return linear_warmup(self.step, start=self.cfg.warmup_teacher_temp, end=self.cfg.teacher_temp,
                             warmup_steps=self.cfg.warmup_teacher_temp_steps)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"center": self.center.cpu()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.center = state["center"].float().to(self.center.device)

    # ----------------------------------------------------------------- the step

    def begin_step(self, step: int, total_steps: int) -> None:
        self.step, self.total_steps = step, total_steps

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.compute_dtype()
        global_crops, local_crops = (crop_major(batch[key]).to(dtype) for key in ("globals", "locals"))
        with torch.no_grad():
            teacher_logits = self.teacher([global_crops]).float()
        student_logits = self.student([global_crops, local_crops]).float()
        self._move_state_to(teacher_logits.device)
        out = dino_loss(student_logits, teacher_logits, self.center, student_temp=self.cfg.student_temp,
                        teacher_temp=self.teacher_temp(), num_views=2 + batch["locals"].shape[1])
        self.teacher_sum += teacher_logits.sum(dim=0)
        self.teacher_count += teacher_logits.shape[0]
        scalar = teacher_logits.new_tensor
        return {**out, "teacher_temp": scalar(self.teacher_temp()), "teacher_momentum": scalar(self.teacher_momentum()),
                "center_norm": self.center.norm()}

    def after_optimizer_step(self, step: int) -> None:
        """Center update over the whole effective batch (every micro-batch of every rank), then reset the sums."""
        if self.teacher_count.item() == 0:
            return
        self.center = updated_center(self.center, self.teacher_sum, self.teacher_count, self.cfg.center_momentum)
        self.teacher_sum.zero_()
        self.teacher_count.zero_()

    def _move_state_to(self, device: torch.device) -> None:
        # fp32 on the compute device; also undoes DeepSpeed's zero.Init, which makes every float tensor created
        # during construction bf16.
        self.center, self.teacher_sum, self.teacher_count = (
            t.to(device, torch.float32) for t in (self.center, self.teacher_sum, self.teacher_count))


def crop_major(views: torch.Tensor) -> torch.Tensor:
    """[B, V, 3, H, W] -> [V*B, 3, H, W] with all images of view 0 first (the order the loss chunks by)."""
    return views.transpose(0, 1).reshape(-1, *views.shape[2:])
