"""MLflow tracking, from global rank 0 only.

Default store: MLflow's own default (sqlite:///mlflow.db in the working directory) unless tracking.uri or
$MLFLOW_TRACKING_URI is set. A tracking server that cannot be reached never stops training: we say so
once, keep the metrics in memory and send them when it answers again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from largessl.config.schema import TrackingConfig

MAX_BUFFERED = 200_000  # metric values kept while the server is away
PARAMS_PER_CALL = 100  # MLflow's log_batch limit


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
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _server_answers(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


class NullTracker:
    """What ranks other than 0 (and runs with tracking off) get."""

    run_id = ""
    uri = ""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


def resolve_uri(cfg: TrackingConfig, fallback: str = "") -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else `fallback` (a resumed run's store), else MLflow's default."""
    # No retries inside MLflow: failed metrics are buffered here, so a dead server never stalls training.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or fallback or mlflow.get_tracking_uri()


class Tracker(NullTracker):
    def __init__(self, client: Any, uri: str, run_id: str, owns_run: bool = True) -> None:
        self.client, self.uri, self.run_id, self.owns_run = client, uri, run_id, owns_run
        self._pending: list[Any] = []
        self._down_since: float | None = None

    @classmethod
    def _connect(cls, uri: str, what: str) -> Any:
        if uri.startswith(("http://", "https://")) and not _server_answers(uri):
            _warn(f"MLflow server {uri} cannot be reached; {what} goes on without tracking")
            return None
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=uri)

    @classmethod
    def start(cls, cfg: TrackingConfig, *, run_name: str, run_id: str = "", params: dict[str, Any],
              tags: dict[str, str], fallback_uri: str = "") -> NullTracker:
        """Reopen run `run_id` (resume) or create one with `params` and `tags`; a NullTracker if unreachable."""
        if not cfg.enabled:
            return NullTracker()
        uri = resolve_uri(cfg, fallback_uri)
        try:
            client = cls._connect(uri, "training")
            if client is None:
                return NullTracker()
            tracker = cls(client, uri, run_id)
            if run_id and tracker._run_exists(run_id):
                client.update_run(run_id, status="RUNNING")
                return tracker
            if run_id:
                _warn(f"MLflow run {run_id} of the checkpoint is not in {uri}; starting a new run")
            tracker.run_id = tracker._create_run(cfg.experiment, run_name, params, tags)
            return tracker
        except Exception as exc:  # any store/server failure: tracking is never worth stopping training for
            _warn(f"MLflow at {uri} failed ({type(exc).__name__}: {exc}); training goes on without tracking")
            return NullTracker()

    @classmethod
    def attach(cls, uri: str, run_id: str) -> NullTracker:
        """An existing run, to add metrics to without changing its status (evaluation after training)."""
        try:
            client = cls._connect(uri, "evaluation")
            tracker = cls(client, uri, run_id, owns_run=False) if client else None
            if tracker and tracker._run_exists(run_id):
                return tracker
            _warn(f"MLflow run {run_id} is not in {uri}; the result is not logged there")
        except Exception as exc:
            _warn(f"MLflow at {uri} failed ({type(exc).__name__}: {exc}); the result is not logged there")
        return NullTracker()

    def _run_exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:
            return False

    def _create_run(self, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        run = self.client.create_run(experiment_id, run_name=run_name, tags={k: v for k, v in tags.items() if v})
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_CALL):
            self.client.log_batch(run.info.run_id, params=items[i:i + PARAMS_PER_CALL])
        return run.info.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        del self._pending[:-MAX_BUFFERED]
        try:
            while self._pending:
                self.client.log_batch(self.run_id, metrics=self._pending[:1000])
                del self._pending[:1000]
        except Exception as exc:
            if self._down_since is None:
                self._down_since = time.time()
                _warn(f"MLflow logging failed ({type(exc).__name__}); metrics are kept and sent when it answers")
            return
        if self._down_since is not None:
            _warn(f"MLflow answers again after {time.time() - self._down_since:.0f}s; buffered metrics sent")
            self._down_since = None

    def log_artifact(self, path: Path) -> None:
        try:
            self.client.log_artifact(self.run_id, str(path))
        except Exception as exc:
            _warn(f"MLflow could not store artifact {path} ({type(exc).__name__}: {exc})")

    def finish(self, status: str = "FINISHED") -> None:
        try:
            if self._pending:
                self.log_metrics({}, 0)
            if self.owns_run:
                self.client.set_terminated(self.run_id, status=status)
        except Exception:
            pass
