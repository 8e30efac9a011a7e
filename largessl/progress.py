"""Throughput, memory and the one-line progress report printed every log interval."""

from __future__ import annotations

import datetime
import resource
import sys
import time

import torch


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated on this device, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class IntervalTimer:
    """Wall time and optimizer steps since the last report."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def tick(self) -> None:
        self.steps += 1

    def step_time(self) -> float:
        return (time.perf_counter() - self.start) / max(1, self.steps)


def progress_line(step: int, max_steps: int, metrics: dict[str, float], loss_terms: list[str]) -> str:
    eta = datetime.timedelta(seconds=round(metrics["step_time"] * (max_steps - step)))
    terms = " ".join(f"{k} {metrics[k]:.4f}" for k in loss_terms)
    return (f"step {step}/{max_steps} | {terms} | lr {metrics['lr']:.3e} | {metrics['images_per_sec']:.1f} img/s "
            f"| {metrics['step_time']:.3f} s/step | ETA {eta}")


def say(message: str) -> None:
    print(message, file=sys.stdout, flush=True)
