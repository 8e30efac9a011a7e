"""Model FLOP utilisation: the FLOP model's useful work per second against the device's dense bf16 peak.

`tflops_per_gpu` = training FLOPs per image (objective.flops_per_image(), 3x trained forward + 1x no-grad forward,
recomputation not counted) x images/s / GPUs; `mfu` = that / the peak. The peak is `distributed.peak_tflops` when
set, else the vendor's dense (not sparse) bf16 rate of a known GPU by its name; on CPU, or on a GPU not in the
table, there is no peak and only `tflops_per_gpu` is reported.
"""

from __future__ import annotations

from typing import Any

import torch

# Dense bf16 tensor-core peaks, TFLOP/s, by vendor datasheets; the first name that occurs in the device's name wins.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L4", 121.0),
)


def peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """The device's dense bf16 peak in TFLOP/s: `override` when > 0, else from PEAK_TFLOPS by name; None on CPU
    or for an unknown GPU."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def utilisation(flops_per_image: float, images_per_sec: float, world_size: int,
                peak: float | None) -> dict[str, float]:
    """{'tflops_per_gpu': ..., 'mfu': ...} (mfu only with a peak)."""
    achieved = flops_per_image * images_per_sec / world_size / 1e12
    return {"tflops_per_gpu": achieved, **({"mfu": achieved / peak} if peak else {})}


class Speed:
    """What a run's throughput means in FLOPs: the objective's training FLOPs per image (taken once, from its
    shapes, before DeepSpeed partitions anything) and the device's peak."""

    def __init__(self, objective: torch.nn.Module, device: torch.device, world_size: int, override: float) -> None:
        try:
            self.flops_per_image: float | None = objective.flops_per_image().train_step
        except NotImplementedError:  # an objective without a FLOP model: no tflops, no mfu
            self.flops_per_image = None
        self.peak, self.world_size = peak_tflops(device, override), world_size

    def plan(self, cfg: Any, step: int, num_samples: int) -> str:
        """The work left from `step` (of a PretrainConfig's schedule), said before the first step: the images, as
        passes over the training split; where the FLOP model and the device's peak are known, the FLOPs and the
        least device-hours they take (at 100% of the peak: a bound, not an estimate; the progress lines give the
        ETA at the measured speed)."""
        images = (cfg.trainer.max_steps - step) * cfg.optim.global_batch_size
        text = f"{images:,} images, {images / num_samples:.3g} passes over data.train's {num_samples:,} samples"
        if self.flops_per_image:
            total = self.flops_per_image * images
            text += f"; {total:.3g} FLOPs"
            if self.peak:
                hours = total / (self.peak * 1e12) / 3600
                text += (f", at least {hours:,.1f} device-hours at the {self.peak:g} TFLOP/s peak "
                         f"({hours / self.world_size:,.1f} h on {self.world_size} devices)")
        return f"{text}; a progress line (with the ETA) every {cfg.trainer.log_every} steps"

    def metrics(self, images_per_sec: float) -> dict[str, float]:
        if self.flops_per_image is None:
            return {}
        return utilisation(self.flops_per_image, images_per_sec, self.world_size, self.peak)
