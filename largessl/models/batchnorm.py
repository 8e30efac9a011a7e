"""Batch norm over tokens, with statistics synchronised across ranks (SIM's projector and predictor norms).

SIM's `PermuteBN` applies BatchNorm1d to [B, L, C] token sequences (channels normalised over all B x L tokens)
in fp32, and the model is converted to SyncBatchNorm, so the statistics span every rank's tokens. torch's
SyncBatchNorm runs only on CUDA; this one runs on any backend: each rank computes its count, mean and sum of
squared deviations in fp32, one differentiable all-gather shares them, and every rank combines them exactly
(Chan's parallel variance), so W ranks of B images compute what one process computes on the W B images, forward
and backward. Running statistics (momentum 0.1, unbiased variance, as torch) are kept in fp32 outside the
module's buffers, where DeepSpeed would cast them to bf16; `SIM.extra_state` saves them in checkpoints.

Reference: https://github.com/OpenGVLab/Siamese-Image-Modeling/blob/main/models_sim.py (PermuteBN)
"""

from __future__ import annotations

import torch
from torch import nn

from largessl.distributed import comm


def token_moments(x: torch.Tensor) -> torch.Tensor:
    """[count, mean (C), sum of squared deviations (C)] of x [B, L, C] over B x L, in fp32: one flat tensor."""
    flat = x.float().reshape(-1, x.shape[-1])
    mean = flat.mean(dim=0)
    m2 = ((flat - mean) ** 2).sum(dim=0)
    return torch.cat([flat.new_tensor([flat.shape[0]]), mean, m2])


def combine_moments(parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of token_moments from each rank -> (total count, mean, biased variance) of all their tokens."""
    channels = (parts.shape[1] - 1) // 2
    counts, means, m2s = parts[:, :1], parts[:, 1:1 + channels], parts[:, 1 + channels:]
    total = counts.sum()
    mean = (counts * means).sum(dim=0) / total
    m2 = m2s.sum(dim=0) + (counts * (means - mean) ** 2).sum(dim=0)
    return total, mean, m2 / total


class TokenSyncBatchNorm(nn.Module):
    """BatchNorm1d over the channels of [B, L, C] tokens, statistics over all ranks; computed in fp32 and
    returned in the input's dtype. Pass as a timm Block's `norm_layer`."""

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, affine: bool = True) -> None:
        super().__init__()
        self.eps, self.momentum, self.dim = eps, momentum, dim
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype)) if affine else None
        self.running_mean = torch.zeros(dim)
        self.running_var = torch.ones(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one cast, used by the statistics and the normalisation alike: the input's gradient is then summed in
        # fp32 and rounded to x's dtype once (two casts would round each path's share separately, then add them)
        xf = x.float()
        if self.training:
            count, mean, var = combine_moments(comm.all_gather_with_grad(token_moments(xf)))
            self._update_running(count, mean.detach(), var.detach())
        else:
            mean, var = (s.to(x.device, torch.float32) for s in (self.running_mean, self.running_var))
        scale = torch.rsqrt(var + self.eps)
        if self.weight is None:  # affine=False: MAE's linear-probe BatchNorm
            return ((xf - mean) * scale).to(x.dtype)
        out = (xf - mean) * (self.weight.float() * scale) + self.bias.float()
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
        # fp32 on the compute device; also undoes DeepSpeed's zero.Init, which creates float tensors as bf16 (the
        # initial zeros and ones are exact in either)
        running = [s.to(mean.device, torch.float32) for s in (self.running_mean, self.running_var)]
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_mean = running[0] * (1 - self.momentum) + mean * self.momentum
        self.running_var = running[1] * (1 - self.momentum) + unbiased * self.momentum

    def extra_repr(self) -> str:
        affine = "" if self.weight is not None else ", affine=False"
        return f"{self.dim}, eps={self.eps}, momentum={self.momentum}{affine}, synchronised over ranks"


def batch_norms(module: nn.Module) -> dict[str, TokenSyncBatchNorm]:
    return {name: m for name, m in module.named_modules() if isinstance(m, TokenSyncBatchNorm)}


def norm_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics of every TokenSyncBatchNorm in `module`, for an objective's extra_state."""
    state = {}
    for name, bn in batch_norms(module).items():
        state[f"{name}.running_mean"], state[f"{name}.running_var"] = bn.running_mean.cpu(), bn.running_var.cpu()
    return state


def load_norm_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore what norm_state saved."""
    for name, bn in batch_norms(module).items():
        bn.running_mean = state[f"{name}.running_mean"].float()
        bn.running_var = state[f"{name}.running_var"].float()
