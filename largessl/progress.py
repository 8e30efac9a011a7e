"""Throughput, memory and the one-line progress report printed every log interval."""

from __future__ import annotations

import contextlib
import datetime
import resource
import sys
import time
from collections.abc import Iterator

import torch


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated on this device, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Interval:
    """Loss sums, optimizer steps and training time since the last report (evaluation time excluded)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.start, self.excluded = 0, time.perf_counter(), 0.0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        for key, value in terms.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def mean_terms(self) -> dict[str, torch.Tensor]:
        return {key: value / max(1, self.steps) for key, value in self.sums.items()}

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start

    def step_time(self) -> float:
        return (time.perf_counter() - self.start - self.excluded) / max(1, self.steps)


def progress_line(step: int, max_steps: int, metrics: dict[str, float], loss_terms: list[str]) -> str:
    eta = datetime.timedelta(seconds=round(metrics["step_time"] * (max_steps - step)))
    terms = " ".join(f"{k} {metrics[k]:.4f}" for k in loss_terms)
    speed = f"{metrics['images_per_sec']:.1f} img/s"
    if "tflops_per_gpu" in metrics:
        speed += f" | {metrics['tflops_per_gpu']:.3g} TFLOP/s per device"
    if "mfu" in metrics:
        speed += f" {100 * metrics['mfu']:.1f}% MFU"
    return (f"step {step}/{max_steps} | {terms} | lr {metrics['lr']:.3e} | {speed} "
            f"| {metrics['step_time']:.3f} s/step | ETA {eta}")


def say(message: str) -> None:
    print(message, file=sys.stdout, flush=True)
