"""MLflow tracking, from global rank 0 only: it never stalls training and loses nothing.

RUN_DIR/metrics.jsonl holds every logged record (appended on the caller's thread) and is also the queue MLflow
is fed from: one background thread sends its lines in order and keeps RUN_DIR/mlflow_run.json up to date with
the run they go to and how many leading lines it has delivered (`sent_records`). While the store does not answer,
the thread retries with backoff; what it has not delivered when the job ends is sent by the next job on the run
directory. Each line carries its MLflow timestamp, and MLflow stores a (key, step, timestamp, value) once, so a
line sent twice (a reply lost to a timeout or a kill) is not doubled.

Store: tracking.uri, else $MLFLOW_TRACKING_URI, else the store of the run being resumed, else MLflow's default
(sqlite:///mlflow.db in the working directory). A SQLite store is made whole before MLflow opens it, on the same
background thread: created whole or not at all, whatever moment the job is killed at, and one that MLflow left
half-made is replaced or reported (sqlite_store.py).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from largessl.config.schema import TrackingConfig
from largessl.threads import bounded
from largessl.tracking.delivery import Delivery, Plan
from largessl.tracking.journal import (
    METRICS_FILE,
    STATE_FILE,
    Journal,
    Reader,
    keep_until,
    read_state,
    warn,
    write_state,
)
from largessl.tracking.sqlite_store import StoreUnusable, open_client
from largessl.tracking.store import (
    browse_hint,
    check_store,
    configure_http,
    configured_uri,
    default_uri,
    describe,
    normalized,
    resolve_uri,
)

__all__ = ["NullTracker", "Tracker", "attach_recorded", "browse_hint", "check_store", "git_commit", "recorded_run",
           "resolve_uri"]

ATTACH_TIMEOUT_S = 15.0  # bound on each MLflow call made for evaluation
ARTIFACT_TIMEOUT_S = 1800.0  # bound on one exported encoder's upload (ViT-H: 2.5 GB)


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

    def __init__(self, cfg: TrackingConfig, journal: Journal, delivery: Delivery | None) -> None:
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
        state = read_state(run_dir)
        run_id = str(state.get("run_id") or fallback_run_id or "")
        # Without mlflow_run.json the old tracker sent every line synchronously: count them as sent.
        sent = int(state.get("sent_records", 0)) if state else (sys.maxsize if run_id else 0)
        kept, sent, offset = keep_until(run_dir / METRICS_FILE, resume_step, sent)
        journal = Journal(run_dir / METRICS_FILE, kept)
        if not cfg.enabled:
            if state:
                _save_quietly(run_dir, {**state, "sent_records": sent})
            return cls(cfg, journal, None)
        uri = _chosen_uri(cfg, run_dir, run_id, str(state.get("uri") or fallback_uri or ""))
        plan = Plan(run_dir=run_dir, uri=uri, experiment=cfg.experiment,
                     run_name=run_name, params=params, tags={k: v for k, v in tags.items() if v},
                     run_key=str(state.get("run_key") or uuid.uuid4().hex), continue_id=run_id)
        delivery = Delivery(plan, journal, Reader(journal.path, offset), sent)
        delivery.experiment = str(state.get("experiment") or cfg.experiment) if run_id else cfg.experiment
        delivery.save_state(force=True)  # sent_records true to the rewritten metrics.jsonl before anything else
        delivery.launch()
        return cls(cfg, journal, delivery)

    @classmethod
    def attach(cls, uri: str, run_id: str) -> NullTracker:
        """An existing run, to add metrics to without changing its status (evaluation after training). Each MLflow
        call is bounded by ATTACH_TIMEOUT_S; failures are reported, never raised (a NullTracker if the run
        cannot be found)."""
        configure_http()
        found: dict[str, Any] = {}

        def find() -> None:
            found["client"] = open_client(uri, create=False)
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
    configured, source = configured_uri(cfg)
    stored = normalized(stored) if stored else ""
    if configured and stored and run_id and configured != stored:
        warn(f"{run_dir}'s MLflow run {run_id} is in {stored}, but {source} names {configured}: the run is "
              "continued there if that store has it, else a new run there gets all of metrics.jsonl")
    return configured or stored or default_uri()


def _save_quietly(run_dir: Path, state: dict[str, Any]) -> None:
    try:
        write_state(run_dir, state)
    except OSError as exc:
        warn(f"cannot write {run_dir / STATE_FILE} ({exc.strerror or exc})")


def recorded_run(cfg: TrackingConfig, run_dir: Path, fallback_run_id: str = "",
                 fallback_uri: str = "") -> tuple[str, str]:
    """(run id, store) of a run directory's MLflow run, as Tracker.start would continue it: from mlflow_run.json,
    else `fallback_run_id` in `fallback_uri` (a checkpoint's client state); ('', store) when neither names one."""
    state = read_state(run_dir)
    if state.get("run_id"):
        return str(state["run_id"]), resolve_uri(cfg, str(state.get("uri") or ""))
    return fallback_run_id or "", resolve_uri(cfg, fallback_uri or "")


def attach_recorded(cfg: TrackingConfig, run_dir: Path, states: dict[str, Any]) -> NullTracker:
    """A run directory's MLflow run, to add results to after training (evaluation, export): the run
    RUN_DIR/mlflow_run.json names (a checkpoint saved while the store was down has no run id), else the one in a
    checkpoint's client state `states`. A NullTracker (run_id '') when tracking is off or neither names a run."""
    if not cfg.enabled:
        return NullTracker()
    run_id, uri = recorded_run(cfg, run_dir, states.get("mlflow_run_id") or "", states.get("tracking_uri") or "")
    return Tracker.attach(uri, run_id) if run_id else NullTracker()


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

    def log_artifact(self, path: Path, artifact_path: str = "") -> None:  # type: ignore[override]
        """Copy a file, or a directory as ARTIFACT_PATH/NAME/..., into the run's artifacts (export)."""
        path, run_id, log = Path(path), self.run_id, self._client.log_artifact
        if path.is_dir():  # MLflow copies a directory's contents: keep its name
            artifact_path, log = f"{artifact_path}/{path.name}".lstrip("/"), self._client.log_artifacts
        if run_id and not _bounded(lambda: log(run_id, str(path), artifact_path or None),
                                   f"logging {path.name} to MLflow run {run_id} in {self.uri}", ARTIFACT_TIMEOUT_S):
            self.run_id = ""


def _bounded(action: Callable[[], object], what: str, timeout: float = ATTACH_TIMEOUT_S) -> bool:
    """Run `action` on a daemon thread for at most `timeout` s; warn and return False if it fails or hangs."""
    ended, _, error = bounded(action, timeout, "largessl-mlflow-attach")
    if not ended:
        warn(f"{what}: no answer within {timeout:g}s; the result is not logged there")
    elif error is not None:
        why = str(error) if isinstance(error, StoreUnusable) else describe(error)
        warn(f"{what} failed ({why}); the result is not logged there")
    return ended and error is None
