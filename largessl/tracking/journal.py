"""The run directory's tracking files: RUN_DIR/metrics.jsonl (every logged record, one JSON line each, and the
queue MLflow is fed from) and RUN_DIR/mlflow_run.json (the MLflow run they go to, and how many leading lines of
metrics.jsonl it has received)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from largessl.console import err_line
from largessl.errors import UserError
from largessl.files import write_atomic

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "mlflow_run.json"
RECORDS_PER_TAKE = 500  # lines of metrics.jsonl read into memory at a time


def warn(message: str) -> None:
    try:
        err_line(f"warning: {message}")
    except (OSError, ValueError):  # stderr closed: interpreter shutdown
        pass



def read_state(run_dir: Path | None) -> dict[str, Any]:
    """RUN_DIR/mlflow_run.json; {} when there is none (an unreadable one is reported and ignored)."""
    path = Path(run_dir or ".") / STATE_FILE
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("sent_records", 0), int):
            raise ValueError("not an object with an integer sent_records")
        return state
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        warn(f"{path} is unreadable ({exc}); ignored")
        return {}


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    write_atomic(run_dir / STATE_FILE, json.dumps(state, indent=1) + "\n")


def _parse(line: bytes) -> dict[str, Any] | None:
    """A metrics.jsonl record, or None for a line that is not one (e.g. cut short by a kill)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def keep_until(path: Path, resume_step: int, sent: int) -> tuple[int, int, int]:
    """Rewrite metrics.jsonl (atomically) without the records after `resume_step` (all of them when it is 0): the
    run resumes from that checkpoint and logs those steps again. Returns (records kept, how many of them are among
    the first `sent` lines, the byte offset where those end)."""
    counts = {"kept": 0, "bytes": 0, "bad": 0, "lines": 0, "sent": 0, "sent_end": 0}

    def kept_lines() -> Iterator[bytes]:
        with open(path, "rb") as source:
            for line in source:
                record = _parse(line)
                counts["bad"] += record is None and bool(line.strip())
                if record is not None and 0 < resume_step and record["step"] <= resume_step:
                    line = line.rstrip(b"\n") + b"\n"
                    counts["kept"] += 1
                    counts["bytes"] += len(line)
                    yield line
                counts["lines"] += 1
                if counts["lines"] <= sent:
                    counts["sent"], counts["sent_end"] = counts["kept"], counts["bytes"]

    path.touch()
    try:
        write_atomic(path, kept_lines())
    except OSError as exc:
        raise UserError(f"cannot rewrite {path}: {exc.strerror or exc}") from None
    if counts["bad"]:
        warn(f"{path}: dropped {counts['bad']} unreadable line(s) (cut short when a job was killed?)")
    return counts["kept"], counts["sent"], counts["sent_end"]


class Journal:
    """RUN_DIR/metrics.jsonl, appended one flushed line per record; `count`: the records in it."""

    def __init__(self, path: Path, count: int) -> None:
        self.path, self.count = path, count
        self._file = open(path, "a", encoding="utf-8")  # open for the tracker's life
        self._failed = False

    def append(self, record: dict[str, Any]) -> bool:
        try:
            if self._file.closed:  # logging after finish(): kept on disk, sent by the next job
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:
            if not self._failed:
                warn(f"cannot append to {self.path} ({exc.strerror or exc}); these metrics are lost")
            self._failed = True
            return False
        self.count += 1
        return True

    def close(self) -> None:
        self._file.close()


class Reader:
    """Reads metrics.jsonl from a byte offset for delivery; the offset moves on only once lines are delivered."""

    def __init__(self, path: Path, offset: int) -> None:
        self.path, self.offset = path, offset
        self._file: Any = None

    def take(self, available: int) -> tuple[list[dict[str, Any]], int]:
        """Up to `available` (at most RECORDS_PER_TAKE) whole records from the offset, and the offset after them."""
        if self._file is None:
            self._file = open(self.path, "rb")  # the delivery thread's, for its life
        self._file.seek(self.offset)
        records, end = [], self.offset
        while len(records) < min(available, RECORDS_PER_TAKE):
            line = self._file.readline()
            if not line.endswith(b"\n"):
                break
            records.append(_parse(line) or {"step": 0})
            end += len(line)
        return records, end

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def metric_entities(records: list[dict[str, Any]]) -> list[Any]:
    """MLflow Metric entities of records; a record without a timestamp (written before they had one) gets now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), int(record.get("timestamp") or now), int(record["step"]))
            for record in records for key, value in record.items()
            if key not in ("step", "timestamp") and isinstance(value, (int, float)) and not isinstance(value, bool)]

