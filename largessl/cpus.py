"""How many CPU threads a process computes with: its share of the CPUs it may actually run on, less its DataLoader
workers.

torch's default is one intra-op thread per core of the machine. Beside its own DataLoader workers, other ranks or
other jobs, those threads wait on each other: MAE ViT-Tiny on a busy 2-core machine ran 16-21x slower with torch's
default than with one thread (4.3 against 71.4 img/s). So a process takes
    max(1, usable CPUs // processes sharing them - DataLoader workers)
threads, where the usable CPUs are the fewest of the CPU affinity set, the cgroup's CPU quota (a container's
`--cpus`) and, in an srun task, SLURM's cpus per task; the processes sharing them are the ranks on this node that
one launcher started with one affinity set (torchrun's, or srun's tasks when no cpus per task was given).

The choice is made before torch is imported and handed over through OMP_NUM_THREADS and MKL_NUM_THREADS, which the
OpenMP runtimes read once at start (torch's and the one a DeepSpeed CPU op links). A value already in the
environment is kept and said: the user's (or torchrun's, which sets 1 for several ranks per node) choice wins.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from largessl.launch.slurm import in_step

VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Threads:
    """The thread count chosen for this process, and the facts it was chosen from."""

    count: int
    cpus: int
    source: str
    sharing: int
    workers: int
    worker_key: str
    preset: str | None = None  # OMP_NUM_THREADS as found in the environment

    def describe(self) -> str:
        """The start-up line."""
        share = f"{self.cpus} CPUs usable ({self.source})" + (
            f" shared by {self.sharing} ranks" if self.sharing > 1 else "")
        workers = f"{self.workers} DataLoader worker{'s' if self.workers != 1 else ''} ({self.worker_key})"
        if self.preset is not None:
            return (f"CPU threads: {self.count} per rank, OMP_NUM_THREADS={self.preset} from the environment "
                    f"(unset, largessl would take {chosen(self.cpus, self.sharing, self.workers)}: {share}, {workers})")
        line = f"CPU threads: {self.count} per rank ({share}, less {workers}; OMP_NUM_THREADS overrides)"
        if self.workers + 1 > self.cpus // self.sharing:
            line += (f"; {self.workers} workers and the rank have {self.cpus // self.sharing} CPU(s): they will wait "
                     "on each other")
        return line


def chosen(cpus: int, sharing: int, workers: int) -> int:
    return max(1, cpus // sharing - workers)


def quota_cpus(cpu_max: str) -> int | None:
    """CPUs a cgroup v2 `cpu.max` line ("200000 100000", "max 100000") allows, rounded up; None without a limit."""
    fields = cpu_max.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """This process's cgroup CPU quota (v2: cpu.max of its own cgroup; v1: cfs_quota_us / cfs_period_us)."""
    try:
        own = next((line[3:].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                    if line.startswith("0::")), "/")
        for directory in (root / own.lstrip("/"), root):
            if (directory / "cpu.max").is_file():
                return quota_cpus((directory / "cpu.max").read_text())
        v1 = root / "cpu"
        if (v1 / "cpu.cfs_quota_us").is_file():
            return quota_cpus(f"{(v1 / 'cpu.cfs_quota_us').read_text()} {(v1 / 'cpu.cfs_period_us').read_text()}")
    except (OSError, ValueError):
        return None
    return None


def usable_cpus(env: Mapping[str, str]) -> tuple[int, str]:
    """(CPUs this process may run on, where that number comes from)."""
    affinity = getattr(os, "sched_getaffinity", None)
    count, source = (len(affinity(0)), "CPU affinity") if affinity else (os.cpu_count() or 1, "cores")
    quota = cgroup_quota()
    if quota is not None and quota < count:
        count, source = quota, "the cgroup's CPU quota"
    per_task = env.get("SLURM_CPUS_PER_TASK", "")
    if in_step(env) and per_task.isdigit() and 0 < int(per_task) < count:
        count, source = int(per_task), "SLURM's cpus per task"
    return count, source


def sharing_ranks(env: Mapping[str, str]) -> int:
    """How many ranks of this node share the usable CPUs: torchrun's ranks all have the launcher's affinity; srun's
    tasks each have their cpus per task when it is given, else they share the node too."""
    if in_step(env) and env.get("SLURM_CPUS_PER_TASK", "").isdigit() and "TORCHELASTIC_RUN_ID" not in env:
        return 1
    local = env.get("LOCAL_WORLD_SIZE", "1")
    return max(1, int(local)) if local.isdigit() else 1


def cpus_per_rank(env: Mapping[str, str] | None = None) -> int:
    """This rank's share of the usable CPUs."""
    env = os.environ if env is None else env
    return max(1, usable_cpus(env)[0] // sharing_ranks(env))


def choose(workers: int, worker_key: str, env: Mapping[str, str] | None = None) -> Threads:
    """The thread count for a process with `workers` DataLoader workers (named `worker_key` in what is said)."""
    env = os.environ if env is None else env
    cpus, source = usable_cpus(env)
    sharing = sharing_ranks(env)
    preset = env.get("OMP_NUM_THREADS")
    if preset is not None and preset.strip().isdigit() and int(preset) > 0:
        return Threads(int(preset), cpus, source, sharing, workers, worker_key, preset=preset.strip())
    return Threads(chosen(cpus, sharing, workers), cpus, source, sharing, workers, worker_key)


def apply(workers: int, worker_key: str) -> str:
    """Choose, hand the choice to the OpenMP and MKL runtimes through the environment (torch is not imported yet),
    and return the line to say."""
    threads = choose(workers, worker_key)
    if threads.preset is None:
        for name in VARIABLES:
            os.environ[name] = str(threads.count)
    if "torch" in sys.modules:  # imported already (a command called in-process): the runtime has read its variables
        sys.modules["torch"].set_num_threads(threads.count)
    return threads.describe()


def announce(workers: int, worker_key: str) -> None:
    """`apply`, said by global rank 0 (the other ranks choose the same for themselves)."""
    line = apply(workers, worker_key)
    if os.environ.get("RANK", "0") == "0":
        print(line, flush=True)


def default_workers(most: int = 8) -> int:
    """A DataLoader worker count for a one-process command: the usable CPUs less one (for the process itself), at
    least one, at most `most`."""
    return max(1, min(most, usable_cpus(os.environ)[0] - 1))
