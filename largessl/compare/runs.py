"""The runs to compare, read from an MLflow store (SQLite or a server): each run's params, tags and the histories
of the metrics a comparison shows.

A run that was requeued or resumed is one MLflow run (the trainer continues it), but the steps a killed job logged
after its last checkpoint were logged again by the job that resumed: a history keeps, for each step, the value
logged last. Values are as logged: NaN, and +-inf, which MLflow's SQL stores keep as +-sys.float_info.max.

Only an MLflow store is opened: a path that is not one (not a database, another program's database, an empty file,
a directory without experiments) is one line naming it and what it is.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from largessl.errors import UserError
from largessl.tracking.sqlite_store import StoreBusy, StoreUnusable, open_client
from largessl.tracking.store import configure_http, describe, error_code, sqlite_file, unreachable

CURVES = ("loss", "gpu_hours", "cpu_hours", "epoch", "images_per_sec")  # histories every comparison reads
DOWNSTREAM_SUFFIX = "_top1"  # knn_top1, knn_top1_mean, linear_top1, attentive_top1, finetune_top1, fewshot_top1...
PAGE = 1000
BARE_SCHEMES = ("databricks", "databricks-uc", "uc")  # URIs MLflow takes as a scheme alone, not as a path


@dataclass
class RunData:
    """One MLflow run: identity, status, times (ms), params, tags and {metric: [(step, value)] by step}."""

    run_id: str
    name: str
    status: str
    start_ms: int
    end_ms: int | None
    params: dict[str, str]
    tags: dict[str, str]
    latest: dict[str, float]  # each metric's latest value, as MLflow keeps it
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    last_ms: int = 0  # when the run last logged a metric


def restored(value: float) -> float:
    """A metric value as it was logged: MLflow's SQL stores keep +-inf as +-sys.float_info.max."""
    return math.copysign(math.inf, value) if abs(value) == sys.float_info.max else value


def by_step(history: list[Any]) -> tuple[list[tuple[int, float]], int]:
    """MLflow metric entries -> ([(step, value)] by step, the value logged last at each step; newest timestamp)."""
    chosen: dict[int, tuple[int, float]] = {}
    for entry in history:
        if entry.step not in chosen or entry.timestamp >= chosen[entry.step][0]:
            chosen[entry.step] = (entry.timestamp, restored(float(entry.value)))
    newest = max((t for t, _ in chosen.values()), default=0)
    return [(step, chosen[step][1]) for step in sorted(chosen)], newest


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (MLflow's own message when it has one), else its type."""
    return (str(getattr(exc, "message", "") or exc).strip().splitlines() or [type(exc).__name__])[0]


def guarded(action: Callable[[], Any], uri: str, what: str) -> Any:
    """`action()`, with an MLflow failure turned into one line: the store did not answer, or refused `what`."""
    try:
        return action()
    except UserError:
        raise
    except Exception as exc:
        if unreachable(exc):
            raise UserError(f"the MLflow store {uri} did not answer ({describe(exc)})") from None
        reason = first_line(exc)
        raise UserError(f"{what}: {reason[:300]}" + (f" ({error_code(exc)})" if error_code(exc) else "")) from None


def local_directory(uri: str) -> Path | None:
    """The directory of a file store (file:PATH or a plain path, as MLflow reads them); None for other stores."""
    parsed = urlparse(uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(os.path.abspath(unquote(parsed.path)))
    bare = not parsed.scheme and uri not in BARE_SCHEMES
    return Path(os.path.abspath(uri)) if uri and bare else None


def not_a_file_store(path: Path) -> str:
    """Why directory `path` is not an MLflow file store ('' when it may be one): it must hold an experiment (a
    directory NUMBER/ with a meta.yaml)."""
    if not path.exists():
        return f"no MLflow store at {path}"
    if not path.is_dir():
        return (f"{path} is a file, not an MLflow file store (a directory); a SQLite store is named "
                f"sqlite:///{path}")
    try:
        with os.scandir(path) as entries:
            if any(e.name.isdigit() and os.path.isfile(os.path.join(e.path, "meta.yaml")) for e in entries):
                return ""
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    return f"{path} is not an MLflow store: it holds no experiment (no NUMBER/meta.yaml)"


def check_local(uri: str) -> None:
    """Refuse in one line a SQLite file that does not exist, and a file store's path that is not one."""
    path, directory = sqlite_file(uri), local_directory(uri)
    if path and not path.exists():
        raise UserError(f"no MLflow store at {path} (set --tracking-uri, or $MLFLOW_TRACKING_URI, to the store "
                        "the runs logged to)")
    problem = not_a_file_store(directory) if directory else ""
    if problem:
        raise UserError(problem)


class Store:
    """An MLflow store opened for reading: a SQLite file or a file store's directory must exist and be one (reading
    never creates a store)."""

    def __init__(self, uri: str) -> None:
        check_local(uri)
        configure_http()
        try:  # a half-made SQLite store holding no runs is replaced by a whole one, as by training
            self.uri, self.client = uri, open_client(uri, create=False)
        except (StoreUnusable, StoreBusy) as exc:
            raise UserError(str(exc)) from None
        except OSError as exc:
            raise UserError(f"the MLflow store {uri} cannot be opened: {exc.strerror or exc}") from None
        except Exception as exc:  # MLflow or SQLAlchemy refusing the URI: an unknown scheme, a malformed URL...
            code = f" ({error_code(exc)})" if error_code(exc) else ""
            raise UserError(f"the MLflow store {uri} cannot be opened: {first_line(exc)[:600]}{code}") from None

    def experiment_id(self, name: str) -> str:
        """The id of experiment `name`; an unknown name is an error that lists the experiments there."""
        found = guarded(lambda: self.client.get_experiment_by_name(name), self.uri, f"experiment {name!r}")
        if found is not None and found.lifecycle_stage == "active":
            return found.experiment_id
        names = sorted(e.name for e in guarded(self.client.search_experiments, self.uri, "listing experiments"))
        listed = ", ".join(names[:20]) + (f" (and {len(names) - 20} more)" if len(names) > 20 else "")
        raise UserError(f"no experiment {name!r} in {self.uri}; " +
                        (f"experiments there: {listed}" if names else "it has no experiments"))

    def search(self, experiment_id: str, filter_string: str) -> list[Any]:
        """Every active run of the experiment that passes the MLflow filter (all pages)."""
        runs, token = [], None
        while True:
            page = guarded(lambda t=token: self.client.search_runs([experiment_id], filter_string=filter_string,
                                                              max_results=PAGE, page_token=t),
                           self.uri, f"--filter {filter_string!r}" if filter_string else "searching runs")
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def load(self, run: Any, metric: str) -> RunData:
        """A run with the histories of the standard curves, of `metric` and of every downstream top-1 it logged."""
        info, data = run.info, run.data
        record = RunData(run_id=info.run_id, name=info.run_name or info.run_id[:8], status=info.status,
                         start_ms=int(info.start_time or 0), end_ms=info.end_time, params=dict(data.params),
                         tags=dict(data.tags), latest={k: restored(v) for k, v in data.metrics.items()})
        keys = {*CURVES, metric, *(k for k in data.metrics if k.endswith(DOWNSTREAM_SUFFIX))}
        for key in sorted(k for k in keys if k in data.metrics):
            history = guarded(lambda k=key: self.client.get_metric_history(info.run_id, k), self.uri,
                              f"metric {key} of run {info.run_id}")
            record.curves[key], newest = by_step(history)
            record.last_ms = max(record.last_ms, newest)
        return record


def select(runs: list[Any], wanted: list[str]) -> list[Any]:
    """The runs named by id or run name in `wanted` (all when it is empty); a name that matches none is an error."""
    if not wanted:
        return runs
    chosen = []
    for name in wanted:
        matches = [r for r in runs if name in (r.info.run_id, r.info.run_name)]
        if not matches:
            known = ", ".join(sorted({r.info.run_name or r.info.run_id for r in runs})[:20])
            raise UserError(f"--runs: no run {name!r} among the selected runs" + (f" ({known})" if known else ""))
        chosen += [r for r in matches if r not in chosen]
    return chosen


def fetch(uri: str, experiment: str, filter_string: str, wanted: list[str], metric: str) -> list[RunData]:
    """The runs of `experiment` to compare, with their histories."""
    store = Store(uri)
    runs = select(store.search(store.experiment_id(experiment), filter_string), wanted)
    if not runs:
        raise UserError(f"nothing to compare: no run in experiment {experiment!r}" +
                        (f" passes --filter {filter_string!r}" if filter_string else ""))
    return [store.load(run, metric) for run in runs]


def now_ms() -> int:
    return int(time.time() * 1000)
