"""MLflow tracking, from global rank 0 only: it never stalls training and loses nothing.

RUN_DIR/metrics.jsonl holds every logged record (appended on the caller's thread) and is also the queue MLflow
is fed from: one background thread sends its lines in order and keeps RUN_DIR/mlflow_run.json up to date with
the run they go to and how many leading lines it has delivered (`sent_records`). While the store does not answer,
the thread retries with backoff; what it has not delivered when the job ends is sent by the next job on the run
directory. Each line carries its MLflow timestamp, and MLflow stores a (key, step, timestamp, value) once, so a
line sent twice (a reply lost to a timeout or a kill) is not doubled.

Store: tracking.uri, else $MLFLOW_TRACKING_URI, else the store of the run being resumed, else MLflow's default
(sqlite:///mlflow.db in the working directory).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from largessl.config.schema import TrackingConfig
from largessl.errors import ConfigError, UserError

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "mlflow_run.json"
RUN_KEY_TAG = "largessl.run_key"  # finds a run whose creation reply was lost, instead of creating a second one
PARAMS_PER_CALL = 100  # MLflow's log_batch limits
METRICS_PER_CALL = 1000
RECORDS_PER_TAKE = 500  # lines of metrics.jsonl read into memory at a time
RETRY_INITIAL_S = 1.0  # wait after a failed attempt; doubles up to RETRY_MAX_S
RETRY_MAX_S = 30.0
FINISH_RETRY_S = 1.0  # longest wait between attempts while finish() waits
STATE_EVERY_S = 5.0  # how often mlflow_run.json's sent_records is brought up to date
HTTP_TIMEOUT_S = 10  # per MLflow HTTP request, unless $MLFLOW_HTTP_REQUEST_TIMEOUT says otherwise
ATTACH_TIMEOUT_S = 15.0  # bound on each MLflow call made for evaluation
REFUSALS = frozenset({  # MLflow error codes of a store that answered and said no: trying again cannot help
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
    "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED", "ENDPOINT_NOT_FOUND",
    "NOT_IMPLEMENTED",
})


def git_commit() -> str:
    """The commit of the largessl source tree, with '-dirty' when it has uncommitted changes; '' if unknown."""
    source = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{commit}-dirty" if commit and dirty else commit


def _warn(message: str) -> None:
    try:
        print(f"warning: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed: interpreter shutdown
        pass


# ----------------------------------------------------------------------------- which store


def _configure_http() -> None:
    """No retries inside MLflow and a short timeout: the delivery thread retries, so a dead or frozen server
    costs it one timeout per attempt, never minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))


def _default_uri() -> str:
    """MLflow's own default store (without importing MLflow): ./mlruns when it holds experiments (an old file
    store), else sqlite ./mlflow.db, both made absolute."""
    mlruns = os.path.abspath("mlruns")
    try:
        with os.scandir(mlruns) as entries:
            if any(e.is_dir() and e.name.isdigit() and os.path.lexists(os.path.join(e.path, "meta.yaml"))
                   for e in entries):
                return Path(mlruns).as_uri()
    except OSError:
        pass
    return "sqlite:///" + os.path.abspath("mlflow.db")


def _normalized(uri: str) -> str:
    """`uri` with a relative SQLite path made absolute (against the working directory) and no trailing '/'."""
    if uri.startswith("sqlite:///") and not uri.startswith(("sqlite:////", "sqlite:///:memory:")):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else uri


def _configured_uri(cfg: TrackingConfig) -> tuple[str, str]:
    """(store, where it is named) from tracking.uri or $MLFLOW_TRACKING_URI; ('', '') when neither is set."""
    if cfg.uri:
        return _normalized(cfg.uri), "tracking.uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return _normalized(os.environ["MLFLOW_TRACKING_URI"]), "$MLFLOW_TRACKING_URI"
    return "", ""


def resolve_uri(cfg: TrackingConfig, fallback: str = "") -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else `fallback` (a resumed run's store), else MLflow's default."""
    return _configured_uri(cfg)[0] or (_normalized(fallback) if fallback else _default_uri())


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI; None for other stores and in-memory databases."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    return Path(os.path.abspath(path)) if path and not path.startswith(":memory:") else None


def _unwritable(path: Path) -> str:
    """Why SQLite could not write database `path` ('' if it can). It needs the file and, for its journal, the
    directory; both are probed for real (opened for writing, a file created and removed), so read-only mounts,
    immutable files and root's rules count as they will for SQLite."""
    directory = path.parent
    if not directory.is_dir():
        return f"{directory} is not a directory" if directory.exists() else f"directory {directory} does not exist"
    if path.is_dir():
        return f"{path} is a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".largessl-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot create files in {directory} ({exc.strerror})"
    if path.exists():
        try:
            os.close(os.open(path, os.O_RDWR))
        except OSError as exc:
            return f"{path} cannot be written ({exc.strerror})"
    return ""


def check_store(cfg: TrackingConfig, run_dir: Path | None = None) -> None:
    """Raise ConfigError in one line, fast (no network), if tracking is enabled and the store is a SQLite file
    that cannot be written (missing directory, read-only directory or file). The store is chosen as by
    Tracker.start: tracking.uri, $MLFLOW_TRACKING_URI, the store in `run_dir`'s mlflow_run.json (when given),
    MLflow's default. Also validates `cfg`."""
    cfg.validate()
    if not cfg.enabled:
        return
    uri, source = _configured_uri(cfg)
    stored = _read_state(run_dir).get("uri", "") if run_dir and not uri else ""
    if stored:
        uri, source = _normalized(stored), f"the run's MLflow store ({Path(run_dir) / STATE_FILE})"
    elif not uri:
        uri, source = _default_uri(), "MLflow's default store (tracking.uri and $MLFLOW_TRACKING_URI unset)"
    path = _sqlite_file(uri)
    problem = _unwritable(path) if path else ""
    if problem:
        raise ConfigError(f"{source}: {uri} cannot be written: {problem}; set tracking.uri to a writable "
                          "sqlite:////PATH/mlflow.db or a server's http://HOST:PORT, or tracking.enabled=false")


# ----------------------------------------------------------------------------- RUN_DIR files


def _read_state(run_dir: Path | None) -> dict[str, Any]:
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
        _warn(f"{path} is unreadable ({exc}); ignored")
        return {}


def _write_atomically(path: Path, data: bytes | Iterator[bytes]) -> None:
    """Write `path` through a temporary file in its directory and os.replace: readers see the old or the new."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in [data] if isinstance(data, bytes) else data:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    _write_atomically(run_dir / STATE_FILE, (json.dumps(state, indent=1) + "\n").encode())


def _parse(line: bytes) -> dict[str, Any] | None:
    """A metrics.jsonl record, or None for a line that is not one (e.g. cut short by a kill)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _keep_until(path: Path, resume_step: int, sent: int) -> tuple[int, int, int]:
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
        _write_atomically(path, kept_lines())
    except OSError as exc:
        raise UserError(f"cannot rewrite {path}: {exc.strerror or exc}") from None
    if counts["bad"]:
        _warn(f"{path}: dropped {counts['bad']} unreadable line(s) (cut short when a job was killed?)")
    return counts["kept"], counts["sent"], counts["sent_end"]


class _Journal:
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
                _warn(f"cannot append to {self.path} ({exc.strerror or exc}); these metrics are lost")
            self._failed = True
            return False
        self.count += 1
        return True

    def close(self) -> None:
        self._file.close()


class _Reader:
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


def _metrics(records: list[dict[str, Any]]) -> list[Any]:
    """MLflow Metric entities of records; a record without a timestamp (written before they had one) gets now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), int(record.get("timestamp") or now), int(record["step"]))
            for record in records for key, value in record.items()
            if key not in ("step", "timestamp") and isinstance(value, (int, float)) and not isinstance(value, bool)]


# ----------------------------------------------------------------------------- errors


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_network(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__module__.startswith(
        ("requests", "urllib3", "http.client", "socket"))


def _unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the store did not answer (refused, reset, timed out), not that it answered no."""
    return any(_is_network(e) for e in _chain(exc))


def _code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", ""))


def _refused(exc: BaseException) -> bool:
    return _code(exc) in REFUSALS and not _unreachable(exc)


def _describe(exc: BaseException) -> str:
    """One short line: the deepest network error when there is one (e.g. 'ConnectionRefusedError: [Errno 111]
    Connection refused'), else the error's first line."""
    inner = [e for e in _chain(exc) if _is_network(e)]
    shown = inner[-1] if inner else exc
    text = (str(shown).strip().splitlines() or [""])[0]
    return f"{type(shown).__name__}: {text[:200]}" if text else type(shown).__name__


class _GiveUp(Exception):
    """Nothing more can be sent this job (the message says why)."""


# ----------------------------------------------------------------------------- the trackers


class NullTracker:
    """What ranks other than 0 get: does nothing at all."""

    run_id = ""
    uri = ""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class Tracker(NullTracker):
    """Rank 0's tracker: owns RUN_DIR/metrics.jsonl and, when tracking is enabled, feeds MLflow from it on one
    background thread. No call waits for MLflow except finish(), for at most tracking.flush_timeout_s."""

    def __init__(self, cfg: TrackingConfig, journal: _Journal, delivery: _Delivery | None) -> None:
        self.cfg, self._journal, self._delivery = cfg, journal, delivery
        self._finished = False

    @property
    def run_id(self) -> str:  # type: ignore[override]
        """The MLflow run: the one being continued, or the new one once created; '' while unknown."""
        return self._delivery.current_run_id() if self._delivery else ""

    @property
    def uri(self) -> str:  # type: ignore[override]
        return self._delivery.uri if self._delivery else ""

    @classmethod
    def start(cls, cfg: TrackingConfig, *, run_dir: Path, run_name: str, params: dict[str, Any],
              tags: dict[str, str], resume_step: int, fallback_run_id: str = "", fallback_uri: str = "") -> Tracker:
        """Rank 0's tracker for `run_dir` (which exists), resuming from the checkpoint at `resume_step` (0: from
        scratch). Returns at once: MLflow is contacted on the background thread. The MLflow run continued is the
        one in RUN_DIR/mlflow_run.json, else `fallback_run_id` in `fallback_uri` (the checkpoint's, for run
        directories from before mlflow_run.json), else a new run named `run_name` with `params` and `tags`."""
        run_dir = Path(run_dir)
        state = _read_state(run_dir)
        run_id = str(state.get("run_id") or fallback_run_id or "")
        # Without mlflow_run.json the old tracker sent every line synchronously: count them as sent.
        sent = int(state.get("sent_records", 0)) if state else (sys.maxsize if run_id else 0)
        kept, sent, offset = _keep_until(run_dir / METRICS_FILE, resume_step, sent)
        journal = _Journal(run_dir / METRICS_FILE, kept)
        if not cfg.enabled:
            if state:
                _save_quietly(run_dir, {**state, "sent_records": sent})
            return cls(cfg, journal, None)
        uri = _chosen_uri(cfg, run_dir, run_id, str(state.get("uri") or fallback_uri or ""))
        plan = _Plan(run_dir=run_dir, uri=uri, experiment=cfg.experiment,
                     run_name=run_name, params=params, tags={k: v for k, v in tags.items() if v},
                     run_key=str(state.get("run_key") or uuid.uuid4().hex), continue_id=run_id)
        delivery = _Delivery(plan, journal, _Reader(journal.path, offset), sent)
        delivery.experiment = str(state.get("experiment") or cfg.experiment) if run_id else cfg.experiment
        delivery.save_state(force=True)  # sent_records true to the rewritten metrics.jsonl before anything else
        delivery.launch()
        return cls(cfg, journal, delivery)

    @classmethod
    def attach(cls, uri: str, run_id: str) -> NullTracker:
        """An existing run, to add metrics to without changing its status (evaluation after training). Each MLflow
        call is bounded by ATTACH_TIMEOUT_S; failures are reported, never raised (a NullTracker if the run
        cannot be found)."""
        _configure_http()
        found: dict[str, Any] = {}

        def find() -> None:
            from mlflow.tracking import MlflowClient

            found["client"] = MlflowClient(tracking_uri=uri)
            if found["client"].get_run(run_id).info.lifecycle_stage != "active":
                raise LookupError(f"run {run_id} is deleted")

        if _bounded(find, f"MLflow run {run_id} in {uri}"):
            return _Attached(uri, run_id, found["client"])
        return NullTracker()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Append {"step", "timestamp" (ms, MLflow's), **metrics} to metrics.jsonl now; MLflow gets it later."""
        record = {"step": int(step), "timestamp": int(time.time() * 1000),
                  **{key: float(value) for key, value in metrics.items()}}
        if self._journal.append(record) and self._delivery and not self._finished:
            self._delivery.wake()

    def log_artifact(self, path: Path) -> None:
        """Send a copy of `path` as it is now (the caller may rewrite it before it is delivered)."""
        if self._delivery and not self._finished:
            self._delivery.add_artifact(Path(path))

    def finish(self, status: str = "FINISHED") -> None:
        """Queue the terminal status ('FINISHED', 'FAILED', 'KILLED') and wait at most tracking.flush_timeout_s
        for MLflow to receive everything; report what it did not. A second call does nothing."""
        if self._finished:
            return
        self._finished = True
        self._journal.close()
        if self._delivery:
            self._delivery.stop(status, min(max(0.0, self.cfg.flush_timeout_s), 1e6))


def _chosen_uri(cfg: TrackingConfig, run_dir: Path, run_id: str, stored: str) -> str:
    """The store: tracking.uri or $MLFLOW_TRACKING_URI when set (saying so when the run being continued is
    recorded in another store: it is continued there if that store has it, else a new run gets all of
    metrics.jsonl), else the store of the run being continued, else MLflow's default."""
    configured, source = _configured_uri(cfg)
    stored = _normalized(stored) if stored else ""
    if configured and stored and run_id and configured != stored:
        _warn(f"{run_dir}'s MLflow run {run_id} is in {stored}, but {source} names {configured}: the run is "
              "continued there if that store has it, else a new run there gets all of metrics.jsonl")
    return configured or stored or _default_uri()


def _save_quietly(run_dir: Path, state: dict[str, Any]) -> None:
    try:
        _write_state(run_dir, state)
    except OSError as exc:
        _warn(f"cannot write {run_dir / STATE_FILE} ({exc.strerror or exc})")


def recorded_run(cfg: TrackingConfig, run_dir: Path, fallback_run_id: str = "",
                 fallback_uri: str = "") -> tuple[str, str]:
    """(run id, store) of a run directory's MLflow run, as Tracker.start would continue it: from mlflow_run.json,
    else `fallback_run_id` in `fallback_uri` (a checkpoint's client state); ('', store) when neither names one."""
    state = _read_state(run_dir)
    if state.get("run_id"):
        return str(state["run_id"]), resolve_uri(cfg, str(state.get("uri") or ""))
    return fallback_run_id or "", resolve_uri(cfg, fallback_uri or "")


class _Plan:
    """What the delivery thread works towards: where, which run, and what a new run starts with."""

    def __init__(self, *, run_dir: Path, uri: str, experiment: str, run_name: str, params: dict[str, Any],
                 tags: dict[str, str], run_key: str, continue_id: str) -> None:
        self.run_dir, self.uri, self.experiment, self.run_name = run_dir, uri, experiment, run_name
        self.params, self.tags, self.run_key, self.continue_id = params, tags, run_key, continue_id


class _Delivery:
    """The one daemon thread that sends metrics.jsonl, the artifacts and the run's status to MLflow, in order,
    retrying with backoff while the store does not answer."""

    def __init__(self, plan: _Plan, journal: _Journal, reader: _Reader, sent: int) -> None:
        self.plan, self.uri, self.journal, self.reader, self.sent = plan, plan.uri, journal, reader, sent
        self.run_id = ""  # the run being written to, once opened or created
        self.experiment = plan.experiment  # the experiment of that run, for mlflow_run.json
        self.client: Any = None
        self.cond = threading.Condition()
        self.artifacts: deque[Path] = deque()
        self.spool: Path | None = None  # copies of the artifacts not sent yet, one directory each
        self.copies = 0
        self.status = ""  # the terminal status, once finish() asked for it
        self.finishing = self.abandoned = self.terminated = self.gave_up = False
        self.doing = "connecting"
        self.refused: set[str] = set()  # what the store refused, said once each
        self.down_since: float | None = None
        self.saved_at, self.dirty, self.state_failed = 0.0, False, False
        self.thread = threading.Thread(target=self._work, name="largessl-mlflow", daemon=True)

    def current_run_id(self) -> str:
        return self.run_id or self.plan.continue_id

    # ---- the caller's side

    def launch(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def add_artifact(self, path: Path) -> None:
        try:
            self.spool = self.spool or Path(tempfile.mkdtemp(prefix="largessl-artifacts-"))
            self.copies += 1
            copy = self.spool / str(self.copies) / path.name
            copy.parent.mkdir()
            shutil.copyfile(path, copy)
        except OSError as exc:
            _warn(f"artifact {path} is not sent to MLflow ({exc.strerror or exc})")
            return
        with self.cond:
            self.artifacts.append(copy)
            self.cond.notify_all()

    def stop(self, status: str, timeout: float) -> None:
        """Ask for `status`, wait at most `timeout` s for everything to be delivered, then let the thread go."""
        with self.cond:
            self.status, self.finishing = status, True
            self.cond.notify_all()
        self.thread.join(timeout)
        with self.cond:
            self.save_state(force=True)  # what was delivered since the thread last wrote it
            self.abandoned = True
            self.cond.notify_all()
        self._report(status, timeout)
        if self.spool:
            shutil.rmtree(self.spool, ignore_errors=True)

    def _report(self, status: str, timeout: float) -> None:
        unsent = self.journal.count - self.sent
        missing = [f"{unsent} metric records"] if unsent else []
        missing += [f"{len(self.artifacts)} artifact(s)"] if self.artifacts else []
        missing += [f"the run status {status}"] if not self.terminated else []
        if missing:
            why = "(see above)" if self.gave_up else f"within tracking.flush_timeout_s={timeout:g}s"
            what = ", ".join(missing[:-1]) + " and " + missing[-1] if len(missing) > 1 else missing[0]
            _warn(f"MLflow at {self.uri} has not received {what} {why}; the metrics are in {self.journal.path}, "
                  "and rerunning the same command (resume) sends them")

    # ---- the thread's side

    def _work(self) -> None:
        delay = RETRY_INITIAL_S
        try:
            while not self.abandoned:
                try:
                    if self._step():
                        return
                except _GiveUp as exc:
                    self.gave_up = True
                    self._say(str(exc))
                    return
                except Exception as exc:  # the store failed or did not answer: keep everything, try again
                    if _refused(exc):
                        self.gave_up = True
                        self._say(f"MLflow at {self.uri} refused {self.doing} ({_describe(exc)}); nothing more "
                                  "is sent this job")
                        return
                    self._failed(exc)
                    self._pause(delay)
                    delay = min(2 * delay, RETRY_MAX_S)
                    continue
                self._answered()
                delay = RETRY_INITIAL_S
        finally:
            self.reader.close()

    def _step(self) -> bool:
        """One piece of delivery; True once everything, the terminal status last, is delivered."""
        if self.client is None:
            self.client = self._connect()
        elif not self.run_id:
            self._open_run()
        elif self.artifacts:
            self._send_artifact()
        elif self.sent < self.journal.count:
            self._send_records()
        elif self.status:
            self._terminate()
            return True
        else:
            self._idle()
        return False

    def _connect(self) -> Any:
        path = _sqlite_file(self.uri)
        problem = _unwritable(path) if path else ""
        if problem:
            raise _GiveUp(f"MLflow store {self.uri} cannot be written: {problem}; nothing is sent this job")
        _configure_http()
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def _open_run(self) -> None:
        continue_id = self.plan.continue_id
        if continue_id:
            self.doing = f"reopening run {continue_id}"
            if self._reopen(continue_id):
                self.run_id = continue_id
                self.save_state(force=True)
                return
            self._say(f"MLflow run {continue_id} is not in {self.uri} (deleted, or another store); a new run "
                      f"gets all {self.journal.count} records of {self.journal.path}")
            self.plan.continue_id, self.sent, self.reader.offset = "", 0, 0
        self.doing = "creating the run"
        self.run_id, self.experiment = self._create_run(), self.plan.experiment
        self.save_state(force=True)

    def _reopen(self, run_id: str) -> bool:
        try:
            run = self.client.get_run(run_id)
        except Exception as exc:
            if _code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and not _unreachable(exc):
                return False
            raise
        if run.info.lifecycle_stage != "active":
            return False
        self.client.update_run(run_id, status="RUNNING")
        return True

    def _create_run(self) -> str:
        """A new run with the plan's tags and params (or the one an earlier attempt created, found by its key)."""
        experiment_id = self._experiment_id()
        key = f"tags.`{RUN_KEY_TAG}` = '{self.plan.run_key}'"
        found = self.client.search_runs([experiment_id], filter_string=key, max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {**self.plan.tags, RUN_KEY_TAG: self.plan.run_key}
            run_id = self.client.create_run(experiment_id, run_name=self.plan.run_name, tags=tags).info.run_id
        from mlflow.entities import Param

        items = [Param(key, str(value)) for key, value in self.plan.params.items()]
        for i in range(0, len(items), PARAMS_PER_CALL):
            chunk = items[i:i + PARAMS_PER_CALL]
            self._refusable("params", lambda chunk=chunk: self.client.log_batch(run_id, params=chunk))
        return run_id

    def _experiment_id(self) -> str:
        name = self.plan.experiment
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name)
            except Exception as exc:
                if _code(exc) != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = self.client.get_experiment_by_name(name)  # another job created it meanwhile
        if found.lifecycle_stage != "active":
            raise _GiveUp(f"MLflow experiment '{name}' is deleted in {self.uri}: restore it (mlflow experiments "
                          "restore) or set tracking.experiment; nothing is sent this job")
        return found.experiment_id

    def _refusable(self, what: str, action: Callable[[], object], local_errors: bool = False) -> None:
        """Run `action`; when the store refuses it (it answered: retrying cannot help), or, with `local_errors`,
        a local file operation fails, go on without it (saying so once per `what`)."""
        try:
            action()
        except Exception as exc:
            local = local_errors and isinstance(exc, OSError) and not _unreachable(exc)
            if not (_refused(exc) or local):
                raise
            if what not in self.refused:
                self.refused.add(what)
                self._say(f"MLflow at {self.uri} refused {what} ({_describe(exc)}); going on without")

    def _send_artifact(self) -> None:
        copy = self.artifacts[0]
        self.doing = f"sending artifact {copy.name}"
        self._refusable(f"artifact {copy.name}", lambda: self.client.log_artifact(self.run_id, str(copy)), True)
        with self.cond:
            self.artifacts.popleft()
        shutil.rmtree(copy.parent, ignore_errors=True)

    def _send_records(self) -> None:
        records, end = self.reader.take(self.journal.count - self.sent)
        if not records:  # metrics.jsonl lost lines under us: nothing to send for them
            self._say(f"{self.journal.path} is shorter than the {self.journal.count} records written to it")
            self.sent = self.journal.count
            return
        self.doing = "sending metrics"
        metrics = _metrics(records)
        for i in range(0, len(metrics), METRICS_PER_CALL):
            chunk = metrics[i:i + METRICS_PER_CALL]
            self._refusable(f"metric values (they stay in {self.journal.path})",
                            lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk))
        self.reader.offset, self.sent, self.dirty = end, self.sent + len(records), True
        self.save_state()

    def _terminate(self) -> None:
        self.doing = f"setting the run's status to {self.status}"
        self._refusable("the run status", lambda: self.client.set_terminated(self.run_id, status=self.status))
        self.terminated = True
        self.save_state(force=True)

    def _idle(self) -> None:
        self.save_state()
        with self.cond:
            self.cond.wait_for(self._has_work, timeout=STATE_EVERY_S)

    def _has_work(self) -> bool:
        return bool(self.abandoned or self.artifacts or self.status or self.sent < self.journal.count)

    def _pause(self, delay: float) -> None:
        """Wait `delay` s before the next attempt (at most FINISH_RETRY_S once finish() waits; it cuts one short)."""
        with self.cond:
            was_finishing = self.finishing
            delay = min(delay, FINISH_RETRY_S) if was_finishing else delay
            self.cond.wait_for(lambda: self.abandoned or self.finishing != was_finishing, timeout=delay)

    def _say(self, message: str) -> None:
        """A warning from the thread, unless finish() has already let it go (its report was the last word)."""
        if not self.abandoned:
            _warn(message)

    def _failed(self, exc: Exception) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            what = "cannot be reached" if _unreachable(exc) else "failed"
            self._say(f"MLflow at {self.uri} {what} while {self.doing} ({_describe(exc)}); metrics are kept "
                      f"in {self.journal.path} and sent when it answers")

    def _answered(self) -> None:
        if self.down_since is not None:
            self._say(f"MLflow at {self.uri} answers again after {time.monotonic() - self.down_since:.0f}s; "
                      "sending what was kept")
            self.down_since = None

    def save_state(self, force: bool = False) -> None:
        """mlflow_run.json: when forced, else when something was delivered and STATE_EVERY_S has passed."""
        if not force and not (self.dirty and time.monotonic() - self.saved_at >= STATE_EVERY_S):
            return
        with self.cond:
            if self.abandoned:
                return
            state = {"run_id": self.current_run_id(), "uri": self.uri, "experiment": self.experiment,
                     "sent_records": self.sent, "run_key": self.plan.run_key}
            try:
                _write_state(self.plan.run_dir, state)
            except OSError as exc:
                if not self.state_failed:
                    self._say(f"cannot write {self.plan.run_dir / STATE_FILE} ({exc.strerror or exc})")
                self.state_failed = True
            self.saved_at, self.dirty = time.monotonic(), False


class _Attached(NullTracker):
    """An existing run that evaluation adds metrics to; its status is left alone. `run_id` becomes '' when a
    send fails (so the caller knows the value is not there)."""

    def __init__(self, uri: str, run_id: str, client: Any) -> None:
        self.uri, self.run_id, self._client = uri, run_id, client

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, int(step)) for key, value in metrics.items()]
        run_id = self.run_id
        if run_id and not _bounded(lambda: self._client.log_batch(run_id, metrics=batch),
                                   f"logging to MLflow run {run_id} in {self.uri}"):
            self.run_id = ""


def _bounded(action: Callable[[], object], what: str) -> bool:
    """Run `action` on a daemon thread for at most ATTACH_TIMEOUT_S; warn and return False if it fails or hangs."""
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            action()
            outcome.append(None)
        except BaseException as exc:  # reported below, on the caller's thread
            outcome.append(exc)

    thread = threading.Thread(target=attempt, name="largessl-mlflow-attach", daemon=True)
    thread.start()
    thread.join(ATTACH_TIMEOUT_S)
    if not outcome:
        _warn(f"{what}: no answer within {ATTACH_TIMEOUT_S:g}s; the result is not logged there")
    elif outcome[0] is not None:
        _warn(f"{what} failed ({_describe(outcome[0])}); the result is not logged there")
    return bool(outcome) and outcome[0] is None
