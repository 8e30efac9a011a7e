"""Running under SLURM without torchrun, pdsh or mpi4py: one `srun` task per GPU.

Ranks: srun sets SLURM_PROCID (global rank), SLURM_LOCALID (rank on the node), SLURM_STEP_NUM_TASKS or SLURM_NTASKS
(world size) and SLURM_STEP_NODELIST / SLURM_JOB_NODELIST (the nodes, as a compressed host list). `rank_env`
maps them onto the variables torch.distributed reads (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT); the rendezvous is the step's first node, on a port derived from the job id, so every task finds
it without talking to the others. Variables already set (by torchrun, or by the user) are kept.

Requeue: sbatch's `--signal=USR1@600` sends SIGUSR1 to every task ten minutes before the time limit. The trainer
saves a checkpoint; then rank 0 runs `scontrol requeue` for the job (once) while every other rank waits, and the
job comes back, in the same run directory, and resumes (SLURM_RESTART_COUNT counts the restarts). A rank that
stops answering ends the job the same way (watchdog.py). Preemption sends SIGTERM: the
trainer saves and stops, and SLURM requeues the job itself when it was submitted with `--requeue`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Mapping

from largessl.console import err_line

REQUEUE_SIGNAL = signal.SIGUSR1
PORT_BASE, PORT_SPAN = 20000, 20000


def in_step(env: Mapping[str, str]) -> bool:
    """Whether this process is a task of an srun job step (the batch script itself is not one: it has
    SLURM_PROCID=0 and the job's task count, but no step of its own)."""
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and env.get("SLURM_STEP_ID") not in ("batch", "extern")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: 'gpu[003-006,9],login1' -> 'gpu003'; 'r[1-2]-n[07-08]' -> 'r1-n07'."""
    depth, head = 0, ""
    for char in nodelist.strip():
        if char == "," and depth == 0:
            break
        depth += {"[": 1, "]": -1}.get(char, 0)
        head += char
    return re.sub(r"\[([^\]\-,]+)[^\]]*\]", r"\1", head)


def rank_env(env: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed's variables for an srun task, from SLURM's; {} outside a job step or when RANK is set."""
    if "RANK" in env or not in_step(env):
        return {}
    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1")
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
    job = int(env.get("SLURM_JOB_ID", "0"))
    local_world = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
    mapped = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": world,
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": re.match(r"\d+", local_world)[0],
        "MASTER_ADDR": first_host(nodes),
        "MASTER_PORT": str(PORT_BASE + job % PORT_SPAN),
    }
    return {key: value for key, value in mapped.items() if key not in env}


def apply_rank_env() -> None:
    """Set the mapped variables in this process (before torch.distributed starts)."""
    os.environ.update(rank_env(os.environ))


def job_id() -> str:
    return os.environ.get("SLURM_JOB_ID", "")


def kill_wait_s() -> float | None:
    """SLURM's KillWait, the seconds between its SIGTERM to a job's processes and its SIGKILL (`scontrol show
    config`); None outside a job, or when scontrol fails or does not answer within 5 s."""
    if not job_id():
        return None
    try:
        shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"^KillWait\s*=\s*(\d+) sec", shown, re.MULTILINE)
    return float(found.group(1)) if found else None


def restart_count() -> int:
    """How often SLURM has requeued this job (0 for its first run, or outside SLURM)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def requeue_on(signum: int, is_main: bool, outcome: str) -> bool:
    """On the time-limit signal (agreed by every rank), rank 0 of a SLURM job puts the job back in the queue; returns
    whether it did. The trainer calls this after the checkpoint is complete and before any rank exits: srun's
    --kill-on-bad-exit ends the step as soon as one rank exits, so a requeue left for later would be lost."""
    if signum != REQUEUE_SIGNAL or not is_main:
        return False
    return requeue(outcome)


def requeue(outcome: str) -> bool:
    """`scontrol requeue` of this job, now: SLURM ends the job's processes (SIGTERM, then SIGKILL after KillWait) and
    starts it again with the same id, so it resumes the same run directory and MLflow run. Says `outcome` when it
    worked, a warning when not; returns whether it worked (False outside a SLURM job)."""
    if not job_id():
        return False
    command = ["scontrol", "requeue", job_id()]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        err_line(f"warning: could not requeue SLURM job {job_id()} ({exc}); resubmit the same script to resume")
        return False
    if done.returncode:
        err_line(f"warning: `{' '.join(command)}` failed ({done.stderr.strip()[:200]}); resubmit the same script "
                 "to resume")
        return False
    print(f"requeued SLURM job {job_id()}: {outcome}", flush=True)
    return True
