"""How each rank ended, kept where every node can read it: `RUN_DIR/ends/rank_N.log`.

A rank's last line goes to stderr, which srun forwards over the network to the job's log; a rank on a node cut
off from the others (or whose srun is gone) says it to nobody. So each rank also appends that line, with the
time, host, pid and SLURM job, to a file of its own in the run directory, which lives on the shared filesystem.
One writer per file (the run lock lets one job at a time hold the run directory), so appends never interleave.
The write has a bound: a node that lost the network may have lost the shared filesystem too, and a rank that must
end cannot wait on it.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from largessl.console import err_line
from largessl.threads import bounded

DIR = "ends"
WRITE_WAIT_S = 3.0  # for the append to the shared filesystem

_target: Path | None = None  # this rank's file, once it holds a run directory


def keep_in(run_dir: Path, rank: int) -> None:
    """This rank holds `run_dir`: its ending lines go to RUN_DIR/ends/rank_N.log too."""
    global _target
    _target = run_dir / DIR / f"rank_{rank}.log"


def say(line: str) -> None:
    """A rank's last line: on stderr, and kept in the run directory."""
    err_line(line)
    keep(line)


def keep(line: str) -> None:
    """Append `line` to this rank's file (nothing before it holds a run directory); a filesystem that fails or does
    not answer within WRITE_WAIT_S is passed over: stderr has the line."""
    path = _target
    if path is not None:
        bounded(lambda: _append(path, stamped(line)), WRITE_WAIT_S, "largessl-ending")


def stamped(line: str) -> str:
    job = os.environ.get("SLURM_JOB_ID", "")
    attempt = f" job {job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else ""
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}{attempt} host {socket.gethostname()} pid {os.getpid()}: {line}"


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(exist_ok=True)
    with open(path, "a") as handle:
        handle.write(text + "\n")
