"""Processes that make an MLflow SQLite store and are SIGKILLed at a chosen moment of it (test_tracking_store.py).

This process imports MLflow and largessl once, then forks one child per job, so a kill costs the making of a store,
not the imports (2-3 s each on 2 cores). Each stdin line is a JSON list of jobs, run at once, one child each; the
answer is one stdout line, a JSON list of how each child ended: {"signal": N} or {"code": N}. A job:

    mode         "mlflow": plain MLflow's first connection (MlflowClient(uri).search_experiments()), as without
                 largessl; "tracker": rank 0's tracker on run_dir (Tracker.start, steps 1-3 logged, finish)
    uri, run_dir, log (the child's stdout and stderr)
    kill_before  SIGKILL the child just before the moment numbered `nth` (from 0) among those whose label matches
                 this regular expression; none: no kill
    after        start only once a file whose name contains this text is in the store's directory
    moments      a file that gets every moment's label, one a line (how many there are)

The moments: each SQL statement ("sql: STATEMENT") and each sqlite3.connect, open, os.link, os.rename and os.remove
of a path in the store's directory ("os.link: SRC DST").
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

FILE_EVENTS = frozenset({"sqlite3.connect", "open", "os.link", "os.rename", "os.remove"})
JOB: dict[str, Any] = {}  # the child's job, with its kill pattern compiled and its moments so far


def moment(label: str) -> None:
    """Record a moment, and die at it if it is the chosen one."""
    JOB["seen"].append(label)
    pattern = JOB.get("pattern")
    if pattern is not None and pattern.search(label):
        if JOB["matched"] == JOB.get("nth", 0):
            os.kill(os.getpid(), signal.SIGKILL)
        JOB["matched"] += 1


def audit(event: str, args: tuple) -> None:
    if event in FILE_EVENTS and JOB and args and JOB["directory"] in str(args[0]):
        moment(f"{event}: " + " ".join(str(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))))


def statement(conn: Any, cursor: Any, text: str, params: Any, context: Any, executemany: bool) -> None:
    if JOB:
        moment("sql: " + " ".join(text.split())[:200])


def plain_mlflow(job: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=job["uri"]).search_experiments()


def tracker(job: dict[str, Any]) -> None:
    from largessl.config.schema import TrackingConfig
    from largessl.tracking import Tracker

    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = TrackingConfig(uri=job["uri"], experiment="e", flush_timeout_s=120)
    job_tracker = Tracker.start(cfg, run_dir=run_dir, run_name=run_dir.name, params={"lr": 0.1}, tags={},
                                resume_step=0)
    for step in (1, 2, 3):
        job_tracker.log_metrics({"loss": float(step)}, step)
    job_tracker.finish()


def child(job: dict[str, Any]) -> int:
    """Run `job` in this (forked) process; its exit code."""
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    directory = str(Path(job["uri"][len("sqlite:///"):]).parent)
    while job.get("after") and not any(job["after"] in name for name in os.listdir(directory)):
        time.sleep(0.01)
    pattern = re.compile(job["kill_before"]) if job.get("kill_before") else None
    JOB.update(job, pattern=pattern, matched=0, seen=[], directory=directory)
    try:
        (plain_mlflow if job["mode"] == "mlflow" else tracker)(job)
        return 0
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        if job.get("moments"):
            Path(job["moments"]).write_text("".join(label + "\n" for label in JOB["seen"]))


def start(job: dict[str, Any]) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child(job)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def ended(pid: int) -> dict[str, int]:
    status = os.waitpid(pid, 0)[1]
    return {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"code": os.WEXITSTATUS(status)}


def main() -> None:
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  # the imports every child needs, done once
    from alembic import command  # noqa: F401
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    import largessl.tracking  # noqa: F401

    sys.addaudithook(audit)
    event.listen(Engine, "before_cursor_execute", statement)
    print("ready", flush=True)
    for line in sys.stdin:
        pids = [start(job) for job in json.loads(line)]
        print(json.dumps([ended(pid) for pid in pids]), flush=True)


if __name__ == "__main__":
    main()
