"""The one background thread that feeds MLflow from metrics.jsonl: it opens or creates the run, sends artifacts,
metrics and the terminal status in order, and retries with backoff while the store does not answer."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from largessl import faults
from largessl.tracking.journal import STATE_FILE, Journal, Reader, metric_entities, warn, write_state
from largessl.tracking.sqlite_store import StoreUnusable, open_client
from largessl.tracking.store import (
    configure_http,
    describe,
    error_code,
    is_refusal,
    sqlite_file,
    unreachable,
    unwritable,
)

RUN_KEY_TAG = "largessl.run_key"  # finds a run whose creation reply was lost, instead of creating a second one
KIND_TAG = "mlflow.experimentKind"  # what MLflow 3's UI reads to open an experiment as a GenAI or a training one
MODEL_TRAINING = "custom_model_development"  # its value for model training: runs table with the metric columns
PARAMS_PER_CALL = 100  # MLflow's log_batch limits
METRICS_PER_CALL = 1000
RETRY_INITIAL_S = 1.0  # wait after a failed attempt; doubles up to RETRY_MAX_S
RETRY_MAX_S = 30.0
FINISH_RETRY_S = 1.0  # longest wait between attempts while finish() waits
STATE_EVERY_S = 5.0  # how often mlflow_run.json's sent_records is brought up to date


class GiveUp(Exception):
    """Nothing more can be sent this job (the message says why)."""



class Plan:
    """What the delivery thread works towards: where, which run, and what a new run starts with."""

    def __init__(self, *, run_dir: Path, uri: str, experiment: str, run_name: str, params: dict[str, Any],
                 tags: dict[str, str], run_key: str, continue_id: str) -> None:
        self.run_dir, self.uri, self.experiment, self.run_name = run_dir, uri, experiment, run_name
        self.params, self.tags, self.run_key, self.continue_id = params, tags, run_key, continue_id


class Delivery:
    """The one daemon thread that sends metrics.jsonl, the artifacts and the run's status to MLflow, in order,
    retrying with backoff while the store does not answer."""

    def __init__(self, plan: Plan, journal: Journal, reader: Reader, sent: int) -> None:
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
            warn(f"artifact {path} is not sent to MLflow ({exc.strerror or exc})")
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
            warn(f"MLflow at {self.uri} has not received {what} {why}; the metrics are in {self.journal.path}, "
                  "and rerunning the same command (resume) sends them")

    # ---- the thread's side

    def _work(self) -> None:
        delay = RETRY_INITIAL_S
        try:
            while not self.abandoned:
                try:
                    if self._step():
                        return
                except GiveUp as exc:
                    self.gave_up = True
                    self._say(str(exc))
                    return
                except Exception as exc:  # the store failed or did not answer: keep everything, try again
                    if is_refusal(exc):
                        self.gave_up = True
                        self._say(f"MLflow at {self.uri} refused {self.doing} ({describe(exc)}); nothing more "
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
        """A client of the store; a SQLite store is first made whole (sqlite_store.open_client: created whole, or
        a half-made one replaced; seconds, here on the thread)."""
        path = sqlite_file(self.uri)
        problem = unwritable(path) if path else ""
        if problem:
            raise GiveUp(f"MLflow store {self.uri} cannot be written: {problem}; nothing is sent this job")
        configure_http()
        try:
            return open_client(self.uri)
        except StoreUnusable as exc:
            raise GiveUp(f"{exc}; nothing is sent this job") from None

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
            if error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and not unreachable(exc):
                return False
            raise
        if run.info.lifecycle_stage != "active":
            return False
        self.client.update_run(run_id, status="RUNNING")
        self._optional(lambda: self._mark_kind(self.client.get_experiment(run.info.experiment_id)))
        self._refusable("the tags of this job", lambda: self._retag(run_id))
        return True

    def _retag(self, run_id: str) -> None:
        """A continued run's tags say what this job is (its SLURM job and restart, world size, commit)."""
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in self.plan.tags.items()])

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
                return self.client.create_experiment(name, tags={KIND_TAG: MODEL_TRAINING})
            except Exception as exc:
                if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = self.client.get_experiment_by_name(name)  # another job created it meanwhile
        if found.lifecycle_stage != "active":
            raise GiveUp(f"MLflow experiment '{name}' is deleted in {self.uri}: restore it (mlflow experiments "
                          "restore) or set tracking.experiment; nothing is sent this job")
        self._optional(lambda: self._mark_kind(found))
        return found.experiment_id

    def _mark_kind(self, experiment: Any) -> None:
        """Tag `experiment` (one from before largessl set KIND_TAG) as model training, unless it has a kind: a
        value someone set is never overwritten."""
        if KIND_TAG not in (experiment.tags or {}):
            self.client.set_experiment_tag(experiment.experiment_id, KIND_TAG, MODEL_TRAINING)

    def _optional(self, action: Callable[[], object]) -> None:
        """The experiment's KIND_TAG: only how MLflow's UI shows it, so any failure but an unanswered store (retried
        with the rest) is said once and the run goes on without it."""
        self._refusable(f"the experiment tag {KIND_TAG}={MODEL_TRAINING}", action, optional=True)

    def _refusable(self, what: str, action: Callable[[], object], local_errors: bool = False,
                   optional: bool = False) -> None:
        """Run `action`; when the store refuses it (it answered: retrying cannot help), or, with `local_errors`,
        a local file operation fails, or, when `optional`, it fails other than by the store not answering, go on
        without it (saying so once per `what`)."""
        try:
            action()
        except Exception as exc:
            tolerated = optional or (local_errors and isinstance(exc, OSError))
            if not (is_refusal(exc) or (tolerated and not unreachable(exc))):
                raise
            if what not in self.refused:
                self.refused.add(what)
                self._say(f"MLflow at {self.uri} refused {what} ({describe(exc)}); going on without")

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
        faults.reached("MLflow delivery")
        metrics = metric_entities(records)
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
            warn(message)

    def _failed(self, exc: Exception) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            what = "cannot be reached" if unreachable(exc) else "failed"
            self._say(f"MLflow at {self.uri} {what} while {self.doing} ({describe(exc)}); metrics are kept "
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
                write_state(self.plan.run_dir, state)
            except OSError as exc:
                if not self.state_failed:
                    self._say(f"cannot write {self.plan.run_dir / STATE_FILE} ({exc.strerror or exc})")
                self.state_failed = True
            self.saved_at, self.dirty = time.monotonic(), False

