"""The run directory: checked before anything is written, and locked while a job uses it.

`run.output_dir/run.name` holds config.yaml, ds_config.json, checkpoints/, metrics.jsonl, eval/. Two jobs with
the same run directory would interleave their metrics and overwrite each other's checkpoints, so a job holds two
advisory locks (flock) for as long as any of its processes lives:
- `.lock`, exclusively, by global rank 0; its content names the holder (host, pid, SLURM job, start time);
- `.lock.ranks`, shared, by every rank (and, inherited, by their DataLoader workers). A new job's rank 0 first
  takes `.lock`, then must get `.lock.ranks` exclusively for a moment: it cannot while any process of an earlier
  job lives (say, a rank whose launcher was killed).
The kernel drops a flock when its holder dies (SIGKILL, node failure, requeue), so a stale lock never blocks a
legitimate resume; there is no lock file to clean up.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any

import yaml

from largessl.config.loader import flatten
from largessl.console import err_line
from largessl.errors import UserError

LOCK, RANKS = ".lock", ".lock.ranks"
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


def holder_record(rank: int) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "rank": rank,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}


def describe_holder(record: dict[str, Any]) -> str:
    if not record:
        return "another process"
    job = f", SLURM job {record['slurm_job_id']}" if record.get("slurm_job_id") else ""
    return f"pid {record.get('pid')} on {record.get('host')}{job}, since {record.get('since')}"


def _flock(handle: IO, mode: int) -> bool:
    """Take a lock without waiting; False if another process holds a conflicting one."""
    try:
        fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


class RunDir:
    """Paths of one run directory, its creation checks, its lock and the config files it records."""

    def __init__(self, output_dir: str, name: str) -> None:
        self.path = Path(output_dir) / name
        self.ckpt_dir = self.path / "checkpoints"
        self._handles: list[IO] = []

    def create(self) -> None:
        """Create the run directory and checkpoints/ and prove both writable; one line naming the path if not."""
        for parent in [self.path.parent, *self.path.parent.parents]:
            if parent.exists() and not parent.is_dir():
                raise UserError(f"run.output_dir: '{parent}' is a file, not a directory; choose another "
                                "run.output_dir")
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"run directory '{self.path}' exists and is not a directory; remove it or choose "
                            "another run.name")
        for directory in (self.path, self.ckpt_dir):
            try:
                directory.mkdir(parents=True, exist_ok=True)
                probe = directory / f".write-test.{socket.gethostname()}.{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as exc:
                raise UserError(f"cannot write to {directory} ({exc.strerror or exc}); make it writable or choose "
                                "another run.output_dir") from None

    # ----------------------------------------------------------------------------- the lock

    def lock_as_main(self) -> str:
        """Rank 0: take `.lock` and check no process of an earlier job lives; '' on success, else why not."""
        main = open(self.path / LOCK, "a+")  # held for the life of the job
        ranks = open(self.path / RANKS, "a+")
        self._handles += [main, ranks]
        try:
            if not _flock(main, fcntl.LOCK_EX):
                holder = next(iter(_read_records(self.path / LOCK)), {})
                return (f"run directory {self.path} is in use by {describe_holder(holder)}; wait for that job to end "
                        "or choose another run.name")
            if not _flock(ranks, fcntl.LOCK_EX):
                others = [describe_holder(r) for r in _read_records(self.path / RANKS)]
                return (f"run directory {self.path} is still used by a process of an earlier job "
                        f"({'; '.join(others) or 'unknown'}); it must end before this run can resume")
            record = json.dumps(holder_record(0)) + "\n"
            for handle in (main, ranks):
                handle.truncate(0)
                handle.write(record)
                handle.flush()
            fcntl.flock(ranks.fileno(), fcntl.LOCK_SH)
            return ""
        except OSError as exc:
            if exc.errno not in UNSUPPORTED:
                raise
            err_line(f"warning: cannot lock {self.path} on this filesystem ({exc.strerror}); nothing keeps a second "
                     "job from using this run directory at the same time")
            return ""

    def lock_as_rank(self, rank: int) -> None:
        """Ranks other than 0, after rank 0 holds the lock: a shared hold on `.lock.ranks`, with a line naming us."""
        ranks = open(self.path / RANKS, "a")
        self._handles.append(ranks)
        with contextlib.suppress(OSError):
            fcntl.flock(ranks.fileno(), fcntl.LOCK_SH)
            ranks.write(json.dumps(holder_record(rank)) + "\n")
            ranks.flush()

    def unlock(self) -> None:
        for handle in self._handles:
            with contextlib.suppress(OSError):
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                handle.close()
        self._handles.clear()

    # ----------------------------------------------------------------------------- recorded config

    def record_config(self, config_text: str, config: dict[str, Any], ds_config: dict[str, Any]) -> list[str]:
        """Write config.yaml and ds_config.json (rank 0); returns the keys that differ from the previous config."""
        previous = self.path / "config.yaml"
        changed = []
        if previous.is_file() and previous.read_text() != config_text:
            old, new = flatten(yaml.safe_load(previous.read_text()) or {}), flatten(config)
            changed = sorted(k for k in new if old.get(k) != new[k])
        previous.write_text(config_text)
        (self.path / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        return changed

    def previous_zero_stage(self) -> int | None:
        """The ZeRO stage of the ds_config.json an earlier job wrote here (None if there is none)."""
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            return int(json.loads((self.path / "ds_config.json").read_text())["zero_optimization"]["stage"])
        return None
