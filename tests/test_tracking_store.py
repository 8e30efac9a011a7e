"""A SQLite MLflow store is whole or absent whatever moment a job is killed at, and a half-made one (plain MLflow
killed while making it) is recovered without losing anything: real MLflow, real SQLite files, real processes
SIGKILLed at chosen moments of the making (tests/store_worker.py forks them: kills at named steps, not delays)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from largessl.compare.runs import Store
from largessl.config.schema import TrackingConfig
from largessl.errors import UserError
from largessl.tracking import NullTracker, Tracker, delivery, sqlite_store

WORKER = Path(__file__).with_name("store_worker.py")
KILLED = {"signal": int(signal.SIGKILL)}
DONE = {"code": 0}
OLD_RUN = "0123456789abcdef0123456789abcdef"
Capture = pytest.CaptureFixture[str]


class Worker:
    """tests/store_worker.py: forks one child per job, each killed at its chosen moment (or not)."""

    def __init__(self, cwd: Path) -> None:
        self.process = subprocess.Popen([sys.executable, str(WORKER)], cwd=cwd, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert self.process.stdout and self.process.stdout.readline().strip() == "ready"

    def run(self, *jobs: dict[str, Any]) -> list[dict[str, int]]:
        """Run `jobs` at once; how each ended ({"signal": 9} or {"code": 0})."""
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(jobs) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        assert self.process.stdin
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    started = Worker(tmp_path_factory.mktemp("worker"))
    yield started
    started.close()


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Retries every 0.1-0.5 s; the working directory is the test's own."""
    monkeypatch.setattr(delivery, "RETRY_INITIAL_S", 0.1)
    monkeypatch.setattr(delivery, "RETRY_MAX_S", 0.5)
    monkeypatch.setattr(delivery, "STATE_EVERY_S", 0.2)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)


# ----------------------------------------------------------------------------- helpers


def store_in(directory: Path) -> tuple[Path, str]:
    path = directory / "store" / "mlflow.db"
    path.parent.mkdir(parents=True)
    return path, f"sqlite:///{path}"


def job(mode: str, uri: str, run_dir: Path, **spec: Any) -> dict[str, Any]:
    """A job for the worker; its stdout and stderr go to RUN_DIR.log."""
    return {"mode": mode, "uri": uri, "run_dir": str(run_dir), "log": f"{run_dir}.log", **spec}


def whole(path: Path) -> bool:
    """Whether MLflow takes `path` as it is: every table it defines is there and its newest migration recorded
    (else it would run its set-up again, or refuse the store)."""
    from mlflow.store.db.utils import Base, _get_latest_schema_revision

    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = db.execute("SELECT version_num FROM alembic_version").fetchall() if "alembic_version" in tables \
            else []
    return set(Base.metadata.tables) <= tables and version == [(_get_latest_schema_revision(),)]


def leftovers(path: Path) -> list[str]:
    """What is in the store's directory besides the store and its lock file."""
    return sorted(set(os.listdir(path.parent)) - {path.name, f".{path.name}.largessl-lock"})


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def age(*paths: Path) -> None:
    """Make files look an hour old: nothing has written to them since."""
    then = time.time() - 3600
    for path in paths:
        os.utime(path, (then, then))


def start(run_dir: Path, uri: str, resume_step: int = 0, flush_timeout_s: float = 60) -> Tracker:
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = TrackingConfig(uri=uri, experiment="e", flush_timeout_s=flush_timeout_s)
    return Tracker.start(cfg, run_dir=run_dir, run_name=run_dir.name, params={"lr": 0.1}, tags={},
                         resume_step=resume_step)


def log(tracker: Tracker, steps: range) -> Tracker:
    for step in steps:
        tracker.log_metrics({"loss": float(step)}, step)
    tracker.finish()
    return tracker


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def history(uri: str, run_id: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss"))


def resumed_delivers_everything(run_dir: Path, uri: str) -> None:
    """The killed job's run directory, resumed as a requeued job would be (from its step-3 checkpoint, then steps 4
    and 5): its MLflow run gets every record of metrics.jsonl."""
    tracker = log(start(run_dir, uri, resume_step=3), range(4, 6))
    assert steps(run_dir)[-2:] == [4, 5]
    assert history(uri, tracker.run_id) == [(step, float(step)) for step in steps(run_dir)]


def add_run(path: Path) -> None:
    """A finished run in experiment 'older', written as MLflow of the store's schema version wrote one."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO experiments (experiment_id, name, lifecycle_stage) VALUES (1, 'older', 'active')")
        db.execute("INSERT INTO runs (run_uuid, name, experiment_id, user_id, status, lifecycle_stage, source_type, "
                   "start_time) VALUES (?, 'older-run', 1, 'someone', 'FINISHED', 'active', 'LOCAL', 0)", (OLD_RUN,))


def version(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def make_at(path: Path, revision: str) -> None:
    """A store as an older MLflow made it, whole: MLflow's first tables, then its migrations up to `revision`."""
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config, create_sqlalchemy_engine
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    engine = create_sqlalchemy_engine(f"sqlite:///{path}")
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(str(engine.url))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    engine.dispose()


# ----------------------------------------------------------------------------- kills while making a store


MAKING = {  # (label pattern, nth match): the steps of making a store, in order; the job is killed just before it
    "before-the-lock": (r"^open: .*largessl-lock", 0),
    "holding-the-lock": (r"^sqlite3\.connect: .*largessl-new", 0),
    "first-table": (r"^sql: CREATE TABLE", 0),
    "mid-migrations": (r"^sql: CREATE TABLE webhooks ", 0),  # where plain MLflow's store breaks for good
    "made-not-yet-linked": (r"^os\.link: ", 0),
    "linked-temporary-name-left": (r"^os\.remove: .*largessl-new", 0),
    "first-use": (r"^sql: INSERT INTO experiments", 0),  # MLflow's first connection adds the Default experiment
}


@pytest.mark.parametrize("step", list(MAKING))
def test_a_job_killed_at_any_step_of_making_the_store_leaves_none_or_a_whole_one(
        worker: Worker, tmp_path: Path, capsys: Capture, step: str) -> None:
    path, uri = store_in(tmp_path)
    pattern, nth = MAKING[step]
    assert worker.run(job("tracker", uri, tmp_path / "run", kill_before=pattern, nth=nth)) == [KILLED]
    assert not path.exists() or whole(path)
    resumed_delivers_everything(tmp_path / "run", uri)
    assert whole(path) and leftovers(path) == []  # a temporary file the kill left is gone
    assert "warning" not in capsys.readouterr().err


@pytest.mark.slow  # test_a_job_killed_at_any_step_of_making_the_store_leaves_none_or_a_whole_one kills at each step
def test_kills_all_along_the_making_of_a_store(worker: Worker, tmp_path: Path) -> None:
    _, uri = store_in(tmp_path / "count")
    assert worker.run(job("tracker", uri, tmp_path / "count-run", moments=str(tmp_path / "moments"))) == [DONE]
    labels = (tmp_path / "moments").read_text().splitlines()
    end = next(i for i, label in enumerate(labels) if label.startswith("sql: INSERT INTO runs"))
    for moment in range(0, end, max(1, end // 40)):
        path, uri = store_in(tmp_path / f"at{moment}")
        run_dir = tmp_path / f"at{moment}" / "run"
        assert worker.run(job("tracker", uri, run_dir, kill_before=".", nth=moment)) == [KILLED], labels[moment]
        assert not path.exists() or whole(path), labels[moment]
        resumed_delivers_everything(run_dir, uri)
        assert whole(path) and leftovers(path) == [], labels[moment]


def test_two_jobs_making_one_store_at_once_both_use_it(worker: Worker, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    path, uri = store_in(tmp_path)
    assert worker.run(job("tracker", uri, tmp_path / "a"), job("tracker", uri, tmp_path / "b")) == [DONE, DONE]
    assert whole(path) and leftovers(path) == []
    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name("e").experiment_id
    runs = MlflowClient(tracking_uri=uri).search_runs([experiment])
    assert sorted(run.info.run_name for run in runs) == ["a", "b"]
    assert all(history(uri, run.info.run_id) == [(1, 1.0), (2, 2.0), (3, 3.0)] for run in runs)
    assert all("warning" not in (tmp_path / f"{name}.log").read_text() for name in "ab")


def test_a_job_killed_while_making_the_store_holds_up_no_other(worker: Worker, tmp_path: Path) -> None:
    """b starts once a is making the store (its temporary file exists), waits for a's lock, and gets it when a is
    killed: it removes a's temporary file and makes the store itself."""
    path, uri = store_in(tmp_path)
    ends = worker.run(job("tracker", uri, tmp_path / "a", kill_before=MAKING["mid-migrations"][0]),
                      job("tracker", uri, tmp_path / "b", after=".largessl-new-"))
    assert ends == [KILLED, DONE]
    assert whole(path) and leftovers(path) == []
    b_run = json.loads((tmp_path / "b" / "mlflow_run.json").read_text())["run_id"]
    assert history(uri, b_run) == [(1, 1.0), (2, 2.0), (3, 3.0)]


# ----------------------------------------------------------------------------- stores left half-made


@pytest.fixture(scope="module")
def half_made(worker: Worker, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store as plain MLflow leaves it when killed while making it (here: after creating table webhooks, before
    webhook_events); it holds nothing."""
    root = tmp_path_factory.mktemp("half-made")
    path, uri = store_in(root)
    assert worker.run(job("mlflow", uri, root / "maker", kill_before=r"^sql: CREATE TABLE webhook_events ")) == [
        KILLED]
    return path


def test_plain_mlflow_killed_while_making_a_store_cannot_open_it_again(
        worker: Worker, half_made: Path, tmp_path: Path) -> None:
    """The bug this is about: every later connection of MLflow's own fails, for good."""
    path, uri = store_in(tmp_path)
    shutil.copy(half_made, path)
    for attempt in ("first", "second"):
        assert worker.run(job("mlflow", uri, tmp_path / attempt)) == [{"code": 1}]
        assert "table webhooks already exists" in (tmp_path / f"{attempt}.log").read_text()
    assert not whole(path)


def test_a_half_made_store_holding_nothing_is_set_aside_and_replaced(
        half_made: Path, tmp_path: Path, capsys: Capture) -> None:
    path, uri = store_in(tmp_path)
    shutil.copy(half_made, path)
    original = digest(path)
    sqlite_store._schema()  # MLflow imported before the 1 s below: a cold import alone can take longer
    waiting = log(start(tmp_path / "run", uri, flush_timeout_s=1), range(1, 3))
    waiting._delivery.thread.join(10)  # type: ignore[union-attr]  # its thread is gone before the file is aged
    assert "another process may be making it" in capsys.readouterr().err  # just written: left alone for now
    assert digest(path) == original and leftovers(path) == []

    age(path)
    log(start(tmp_path / "run", uri, resume_step=2), range(3, 4))
    said = [line for line in capsys.readouterr().err.splitlines() if "half-made" in line]
    [aside] = [tmp_path / "store" / name for name in leftovers(path)]
    assert aside.name.startswith("mlflow.db.half-made-") and digest(aside) == original  # renamed, not changed
    assert said == [f"warning: MLflow store {path} was left half-made (its creation was cut short; it holds no "
                    f"runs): moved to {aside}; a whole one is made in its place"]
    assert whole(path)
    run_id = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]
    assert history(uri, run_id) == [(1, 1.0), (2, 2.0), (3, 3.0)]


RECOVERING = {  # steps of replacing a half-made store (with a journal beside it); the job is killed just before it
    "store-aside-journal-not": (r"^os\.rename: \S*mlflow\.db-journal ", 0),
    "aside-before-making": (r"^sqlite3\.connect: .*largessl-new", 0),
}


@pytest.mark.parametrize("step", list(RECOVERING))
def test_a_job_killed_while_replacing_a_half_made_store_leaves_it_aside_whole(
        worker: Worker, half_made: Path, tmp_path: Path, capsys: Capture, step: str) -> None:
    path, uri = store_in(tmp_path)
    shutil.copy(half_made, path)
    journal = path.with_name("mlflow.db-journal")
    journal.write_bytes(bytes(512))  # what a killed writer can leave beside it: a journal whose header is zeroed
    age(path, journal)
    original = digest(path)
    pattern, nth = RECOVERING[step]
    assert worker.run(job("tracker", uri, tmp_path / "run", kill_before=pattern, nth=nth)) == [KILLED]
    assert "was left half-made" in (tmp_path / "run.log").read_text()
    resumed_delivers_everything(tmp_path / "run", uri)
    assert whole(path) and not journal.exists()
    assert not [name for name in leftovers(path) if "largessl-new" in name]
    set_aside = [name for name in leftovers(path) if name.startswith("mlflow.db.half-made-")]
    [aside] = [tmp_path / "store" / name for name in set_aside if not name.endswith("-journal")]  # once, whole
    assert digest(aside) == original
    assert "half-made" not in capsys.readouterr().err  # set aside once, by the killed job


def test_a_half_made_store_holding_runs_is_left_as_it_is_with_one_line(
        half_made: Path, tmp_path: Path, capsys: Capture) -> None:
    """What an MLflow upgrade of a store with runs, cut short, leaves: no training, evaluation or comparison
    changes it, and each says in one line what is wrong and what to do."""
    path, uri = store_in(tmp_path)
    shutil.copy(half_made, path)
    add_run(path)
    original = digest(path)
    log(start(tmp_path / "run", uri, flush_timeout_s=10), range(1, 3))
    said = [line for line in capsys.readouterr().err.splitlines() if "half-made" in line]
    problem = (f"MLflow store {path} holds 1 run(s), 1 experiment(s) but is half-made, as an MLflow upgrade cut "
               "short leaves it (OperationalError: (sqlite3.OperationalError) table webhooks already exists); it "
               "is left as it is: restore it from a backup, or use another store")
    assert said == [f"warning: {problem}; nothing is sent this job"]
    assert steps(tmp_path / "run") == [1, 2]  # kept for a later job

    with pytest.raises(UserError) as refused:
        Store(uri)
    assert str(refused.value) == problem
    assert type(Tracker.attach(uri, OLD_RUN)) is NullTracker
    assert problem in capsys.readouterr().err
    assert digest(path) == original and leftovers(path) == []


def test_a_store_an_older_mlflow_made_is_upgraded_as_mlflow_does(
        half_made: Path, tmp_path: Path, capsys: Capture) -> None:
    """Not whole but holding runs, at the same schema version as the half-made store: MLflow upgrades it."""
    from mlflow.tracking import MlflowClient

    path, uri = store_in(tmp_path)
    make_at(path, version(half_made))
    add_run(path)
    tracker = log(start(tmp_path / "run", uri), range(1, 3))
    assert history(uri, tracker.run_id) == [(1, 1.0), (2, 2.0)]
    assert MlflowClient(tracking_uri=uri).get_run(OLD_RUN).info.run_name == "older-run"
    assert whole(path) and leftovers(path) == []
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("aged", [False, True])
def test_another_programs_database_is_never_set_aside_nor_replaced(tmp_path: Path, capsys: Capture,
                                                                   aged: bool) -> None:
    """tracking.uri naming an SQLite database of another program (tables, none of them MLflow's): training says so
    in one line and keeps its metrics for a later job; comparison and evaluation refuse it; the file is untouched,
    however long ago it was written."""
    path, uri = store_in(tmp_path)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE users (name TEXT)")
        db.execute("INSERT INTO users VALUES ('ada')")
        db.commit()
    if aged:
        age(path)
    original = digest(path)
    log(start(tmp_path / "run", uri, flush_timeout_s=5), range(1, 3))
    said = [line for line in capsys.readouterr().err.splitlines() if "another program" in line]
    assert said == [f"warning: {path} is an SQLite database of another program (tables users), not an MLflow store; "
                    "it is left as it is: choose another store (tracking.uri); nothing is sent this job"], said
    assert steps(tmp_path / "run") == [1, 2]
    with pytest.raises(UserError, match="without MLflow's tables"):
        Store(uri)
    assert type(Tracker.attach(uri, OLD_RUN)) is NullTracker
    assert digest(path) == original and leftovers(path) == []
