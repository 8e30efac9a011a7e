"""What a run has cost: RUN_DIR/usage.json lists every job that trained it (start, last sign of life, world size),
so its device-hours count each restart, the queue time between jobs not at all, and the work a killed job did
after its last checkpoint (done again by the next job) twice, as it was paid for twice.

The trainer logs the total at each progress line and once more when the job ends, as the metric `gpu_hours` on
GPUs and `cpu_hours` (processes x wall time) on CPUs, so a CPU run never reports GPU-hours; `largessl compare`
reads either. Rank 0 only; a file that cannot be written is said once and never stops training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from largessl.files import write_atomic
from largessl.tracking.journal import warn

USAGE_FILE = "usage.json"


def read_jobs(run_dir: Path) -> list[dict[str, Any]]:
    """The jobs recorded in RUN_DIR/usage.json ([] when there is none or it is unreadable)."""
    try:
        jobs = json.loads((Path(run_dir) / USAGE_FILE).read_text()).get("jobs", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [j for j in jobs if isinstance(j, dict) and {"start", "end", "world_size"} <= j.keys()]


def device_hours(jobs: list[dict[str, Any]]) -> float:
    return sum(float(j["world_size"]) * max(0.0, float(j["end"]) - float(j["start"])) for j in jobs) / 3600.0


class Usage:
    """This job's entry in RUN_DIR/usage.json, after the entries of the jobs before it."""

    def __init__(self, run_dir: Path, world_size: int, started: float, device_type: str = "cuda") -> None:
        self.path = Path(run_dir) / USAGE_FILE
        self.metric = "gpu_hours" if device_type == "cuda" else "cpu_hours"
        self.earlier = read_jobs(run_dir)
        self.job = {"start": started, "end": started, "world_size": int(world_size)}
        self.warned = False

    def hours(self) -> float:
        """The run's device-hours up to now (world size x wall time, summed over its jobs); records them."""
        self.job["end"] = time.time()
        jobs = [*self.earlier, self.job]
        try:
            write_atomic(self.path, json.dumps({"jobs": jobs}, indent=1) + "\n")
        except OSError as exc:
            if not self.warned:
                warn(f"cannot write {self.path} ({exc.strerror or exc}); the next job of this run will not count "
                     "this one's hours")
                self.warned = True
        return device_hours(jobs)

    def logged(self) -> dict[str, float]:
        """The metric to log: {gpu_hours or cpu_hours: the run's hours up to now}."""
        return {self.metric: self.hours()}
