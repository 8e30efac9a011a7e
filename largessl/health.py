"""Divergence detection: a non-finite loss or gradient norm, noticed without a per-step host sync.

Every optimizer step folds `isfinite(loss)` (and the gradient norm DeepSpeed computed, where it keeps one) into a
device-side record of the first bad step; the trainer reads it in the collective it already pays at log steps and
stop checks, and before every checkpoint, which is also refused when the weights themselves are not finite. So a
run that diverges stops within those few steps and never writes, points `latest` at, or prunes towards weights
holding NaN or inf. fp16's loss-scale overflows are not divergence: DeepSpeed skips those steps and lowers the
scale, so under fp16 only the (fp32) loss is checked.
"""

from __future__ import annotations

import math

import torch

from largessl.errors import SharedError

NEVER = 2.0**52  # encodes "no bad step" so that a max-reduce over ranks yields the earliest bad step


class DivergedError(SharedError):
    """Training produced a non-finite loss, gradient norm or weight; nothing after the last good checkpoint kept."""


class FiniteGuard:
    """The first optimizer step (1-based) whose loss or gradient norm was not finite, kept on the device."""

    def __init__(self, device: torch.device, *, grad_overflow_is_skipped: bool) -> None:
        self.first_bad = torch.full((), -1.0, dtype=torch.float64, device=device)
        self.grad_overflow_is_skipped = grad_overflow_is_skipped

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | float | None) -> None:
        """Fold one optimizer step in (no host sync: tensors stay on the device)."""
        bad = ~torch.isfinite(loss.detach()).all()
        if not self.grad_overflow_is_skipped:
            if isinstance(grad_norm, torch.Tensor):
                bad = bad | ~torch.isfinite(grad_norm.detach()).all()
            elif grad_norm is not None and not math.isfinite(grad_norm):
                bad = torch.ones_like(bad)
        self.first_bad = torch.where(bad & (self.first_bad < 0), float(step), self.first_bad)

    def encoded(self) -> torch.Tensor:
        """NEVER - first bad step, or 0 when all was finite: the max over ranks decodes to the earliest bad step."""
        return torch.where(self.first_bad >= 0, NEVER - self.first_bad, torch.zeros_like(self.first_bad))


def decode_first_bad(value: float) -> int | None:
    return None if value <= 0 else int(round(NEVER - value))


def diverged(step: int, newest_checkpoint: str, what: str = "the loss or the gradient norm") -> DivergedError:
    if newest_checkpoint:
        kept = (f"the newest checkpoint, {newest_checkpoint}, is from before it. Rerun to resume from that "
                "checkpoint")
    else:
        kept = "no checkpoint was written before it. Rerun to start again"
    return DivergedError(f"{what} was not finite (NaN or inf) at step {step}: training diverged and stopped; {kept} "
                         "after lowering optim.base_lr (or raising optim.warmup_steps, or setting optim.grad_clip)")
