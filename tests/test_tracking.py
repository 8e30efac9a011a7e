"""MLflow tracking that never stalls training and loses nothing: real `mlflow server` processes on 127.0.0.1,
real SQLite stores, real files. One server is shared by the module; an outage of it is a real TCP port where
nothing listens (a `Gate` in front of it, closed), a frozen server is its process group SIGSTOPped."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import free_port

from largessl.config.schema import TrackingConfig
from largessl.errors import ConfigError
from largessl.tracking import NullTracker, Tracker, browse_hint, check_store, delivery, resolve_uri

PARAMS = {f"group.p{i:03d}": i for i in range(150)}  # more than one log_batch of params (100 per call)
TAGS = {"method": "mae", "slurm_job_id": ""}  # empty tags are not set
Server = SimpleNamespace  # uri, port, process
Capture = pytest.CaptureFixture[str]


# ----------------------------------------------------------------------------- real servers


def serve(root: Path, port: int) -> subprocess.Popen:
    root.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "art")],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(360):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    kill(server)
    raise RuntimeError("mlflow server did not start")


def kill(server: subprocess.Popen) -> None:
    """SIGKILL the server and its worker processes (a crash, not a shutdown)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGCONT)
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    process = serve(tmp_path_factory.mktemp("mlflow-server"), port)
    yield SimpleNamespace(uri=f"http://127.0.0.1:{port}", port=port, process=process)
    kill(process)


class Gate:
    """A TCP forwarder from a port of its own to the server's. Until open() nothing listens on its port, so a
    client gets what it gets from a server that is down: connection refused. With `lose_reply_to` set, the first
    request containing those bytes reaches the server but its reply does not reach the client (the connection is
    cut instead), as when a server answers just as the network fails."""

    def __init__(self, target_port: int) -> None:
        self.port, self.target = free_port(), target_port
        self.uri = f"http://127.0.0.1:{self.port}"
        self.lose_reply_to: bytes | None = None
        self._listener: socket.socket | None = None

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def close(self) -> None:
        if self._listener:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            losing = threading.Event()
            threading.Thread(target=self._requests, args=(client, upstream, losing), daemon=True).start()
            threading.Thread(target=_replies, args=(upstream, client, losing), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, losing: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if self.lose_reply_to and self.lose_reply_to in data:
                    self.lose_reply_to = None
                    losing.set()
                upstream.sendall(data)
            upstream.shutdown(socket.SHUT_WR)


def _replies(upstream: socket.socket, client: socket.socket, losing: threading.Event) -> None:
    with contextlib.suppress(OSError):
        while data := upstream.recv(65536):
            if losing.is_set():  # the server has answered: cut the client off instead
                break
            client.sendall(data)
    for end in (client, upstream):
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)
        end.close()


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Retries every 0.1-0.5 s, mlflow_run.json kept up to date every 0.2 s, 2 s HTTP timeouts; the working
    directory (where MLflow's default store would go) is the test's own."""
    monkeypatch.setattr(delivery, "RETRY_INITIAL_S", 0.1)
    monkeypatch.setattr(delivery, "RETRY_MAX_S", 0.5)
    monkeypatch.setattr(delivery, "STATE_EVERY_S", 0.2)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)


def start(run_dir: Path, cfg: TrackingConfig, resume_step: int, name: str = "r", **kw: str) -> Tracker:
    run_dir.mkdir(parents=True, exist_ok=True)
    return Tracker.start(cfg, run_dir=run_dir, run_name=name, params=PARAMS, tags=TAGS, resume_step=resume_step,
                         **kw)


def log_steps(tracker: NullTracker, steps: range, **extra: float) -> None:
    for step in steps:
        tracker.log_metrics({"loss": float(step), **extra}, step)


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def state(run_dir: Path) -> dict:
    return json.loads((run_dir / "mlflow_run.json").read_text())


def client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def history(uri: str, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def runs_named(uri: str, experiment: str, name: str) -> list:
    found = client(uri).get_experiment_by_name(experiment)
    return client(uri).search_runs([found.experiment_id], filter_string=f"attributes.run_name = '{name}'")


def wait_for(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def timed(action: Callable[[], object], limit: float = 60) -> float:
    """Seconds `action` takes, run on a thread: one that is still running after `limit` s fails the test (rather
    than hanging it), and what it raises is raised here."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as exc:
            raised.append(exc)

    began = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit)
    assert not worker.is_alive(), f"still running after {limit}s"
    if raised:
        raise raised[0]
    return time.monotonic() - began


# ----------------------------------------------------------------------------- outages


def test_a_store_down_at_start_gets_everything_once_it_answers(tmp_path: Path, capsys: Capture) -> None:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"  # nothing listens here yet
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("model: vit\n")
    began = time.monotonic()
    tracker = start(run_dir, TrackingConfig(uri=uri, experiment="down-at-start"), resume_step=0, name="late")
    assert time.monotonic() - began < 1  # no network on the caller's thread
    tracker.log_artifact(run_dir / "config.yaml")
    (run_dir / "config.yaml").write_text("model: changed after log_artifact\n")  # the logged copy is unchanged
    log_steps(tracker, range(1, 4), lr=0.5)
    assert [(r["step"], r["loss"], r["lr"]) for r in lines(run_dir)] == [(1, 1.0, 0.5), (2, 2.0, 0.5), (3, 3.0, 0.5)]
    wait_for(lambda: "cannot be reached" in capsys.readouterr().err)
    server = serve(tmp_path / "late-server", port)
    try:
        log_steps(tracker, range(4, 5))
        tracker.finish()
        err = capsys.readouterr().err
        assert "answers again" in err and "cannot be reached" not in err and "has not received" not in err
        saved = state(run_dir)
        assert saved["run_id"] == tracker.run_id and saved["uri"] == uri and saved["experiment"] == "down-at-start"
        assert saved["sent_records"] == 4
        run = client(uri).get_run(tracker.run_id)
        assert (run.info.run_name, run.info.status) == ("late", "FINISHED")
        assert run.data.params == {k: str(v) for k, v in PARAMS.items()}
        assert run.data.tags["method"] == "mae" and "slurm_job_id" not in run.data.tags
        assert history(uri, tracker.run_id) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
        assert history(uri, tracker.run_id, "lr") == [(1, 0.5), (2, 0.5), (3, 0.5)]
        local = client(uri).download_artifacts(tracker.run_id, "config.yaml", str(tmp_path))
        assert Path(local).read_text() == "model: vit\n"
        assert len(runs_named(uri, "down-at-start", "late")) == 1
    finally:
        kill(server)


def test_a_resumed_job_continues_the_run_and_replaces_the_steps_after_the_checkpoint(
        server: Server, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = TrackingConfig(uri=server.uri, experiment="resume")
    job1 = start(run_dir, cfg, resume_step=0, name="resumed")
    log_steps(job1, range(1, 6))
    job1.finish("KILLED")  # preempted at step 5; the last checkpoint is at step 3
    assert client(server.uri).get_run(job1.run_id).info.status == "KILLED"

    job2 = start(run_dir, cfg, resume_step=3, name="resumed")
    assert [r["step"] for r in lines(run_dir)] == [1, 2, 3]  # at once, before anything is logged
    for step in range(4, 7):
        job2.log_metrics({"loss": 10.0 + step}, step)
    job2.finish()
    assert [(r["step"], r["loss"]) for r in lines(run_dir)] == [(1, 1), (2, 2), (3, 3), (4, 14), (5, 15), (6, 16)]
    runs = runs_named(server.uri, "resume", "resumed")
    assert [r.info.run_id for r in runs] == [job1.run_id] and runs[0].info.status == "FINISHED"
    assert job2.run_id == job1.run_id and state(run_dir)["sent_records"] == 6
    # MLflow cannot delete values: steps 4 and 5 hold both jobs' values, the resumed one with the later timestamp.
    values = client(server.uri).get_metric_history(job1.run_id, "loss")
    assert sorted(m.step for m in values) == [1, 2, 3, 4, 4, 5, 5, 6]
    latest = {m.step: m.value for m in sorted(values, key=lambda m: m.timestamp)}
    assert latest == {1: 1, 2: 2, 3: 3, 4: 14, 5: 15, 6: 16}


def test_a_job_that_never_reached_the_store_is_sent_by_the_next_job(
        server: Server, tmp_path: Path, capsys: Capture) -> None:
    gate = Gate(server.port)
    run_dir = tmp_path / "run"
    cfg = TrackingConfig(uri=gate.uri, experiment="offline", flush_timeout_s=1)
    job1 = start(run_dir, cfg, resume_step=0, name="offline")
    log_steps(job1, range(1, 5))
    assert timed(lambda: job1.finish("KILLED")) < 2
    err = capsys.readouterr().err
    assert err.count("cannot be reached") == 1
    assert "4 metric records" in err and str(run_dir / "metrics.jsonl") in err and "rerun" in err
    assert job1.run_id == ""
    gate.open()
    try:
        job2 = start(run_dir, TrackingConfig(uri=gate.uri, experiment="offline"), resume_step=4, name="offline")
        log_steps(job2, range(5, 7))
        job2.finish()
        assert "has not received" not in capsys.readouterr().err
        runs = runs_named(gate.uri, "offline", "offline")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert history(gate.uri, job2.run_id) == [(s, float(s)) for s in range(1, 7)]
        assert runs[0].data.params["group.p149"] == "149"
    finally:
        gate.close()


def test_a_run_whose_creation_reply_is_lost_is_not_created_twice(server: Server, tmp_path: Path) -> None:
    gate = Gate(server.port)
    gate.lose_reply_to = b"/api/2.0/mlflow/runs/create "
    gate.open()
    try:
        job = start(tmp_path / "run", TrackingConfig(uri=gate.uri, experiment="lost-reply"), resume_step=0,
                    name="lost")
        log_steps(job, range(1, 3))
        job.finish()
    finally:
        gate.close()
    assert gate.lose_reply_to is None  # the reply was lost, the client tried again
    runs = runs_named(server.uri, "lost-reply", "lost")
    assert [r.info.run_id for r in runs] == [job.run_id] and runs[0].info.status == "FINISHED"
    assert history(server.uri, job.run_id) == [(1, 1.0), (2, 2.0)]
    assert runs[0].data.params["group.p000"] == "0"


def test_a_frozen_server_stalls_neither_logging_nor_finish_and_nothing_is_doubled(
        server: Server, tmp_path: Path, capsys: Capture) -> None:
    run_dir = tmp_path / "run"
    job1 = start(run_dir, TrackingConfig(uri=server.uri, experiment="frozen", flush_timeout_s=2), resume_step=0,
                 name="frozen")
    log_steps(job1, range(1, 2))
    wait_for(lambda: (run_dir / "mlflow_run.json").exists() and state(run_dir)["sent_records"] == 1)
    os.killpg(server.process.pid, signal.SIGSTOP)  # the kernel still accepts connections; nobody answers
    try:
        assert timed(lambda: log_steps(job1, range(2, 102), lr=0.1), limit=10) < 0.5
        seconds = timed(lambda: job1.finish("KILLED"), limit=10)
        assert 1.5 < seconds < 3.5, seconds
        assert "100 metric records" in capsys.readouterr().err
    finally:
        os.killpg(server.process.pid, signal.SIGCONT)
    job2 = start(run_dir, TrackingConfig(uri=server.uri, experiment="frozen"), resume_step=101, name="frozen")
    job2.finish()
    assert "has not received" not in capsys.readouterr().err
    # Requests the frozen server had taken in are answered after SIGCONT and then sent again by job 2: each
    # record carries its timestamp, and MLflow stores a (key, step, timestamp, value) once.
    assert [s for s, _ in history(server.uri, job2.run_id)] == list(range(1, 102))
    assert [s for s, _ in history(server.uri, job2.run_id, "lr")] == list(range(2, 102))
    assert len(runs_named(server.uri, "frozen", "frozen")) == 1


def test_a_deleted_run_is_replaced_by_a_new_run_with_the_whole_history(
        server: Server, tmp_path: Path, capsys: Capture) -> None:
    run_dir = tmp_path / "run"
    cfg = TrackingConfig(uri=server.uri, experiment="deleted")
    job1 = start(run_dir, cfg, resume_step=0, name="gone")
    log_steps(job1, range(1, 4))
    job1.finish()
    client(server.uri).delete_run(job1.run_id)
    job2 = start(run_dir, cfg, resume_step=3, name="gone")
    log_steps(job2, range(4, 5))
    job2.finish()
    assert f"MLflow run {job1.run_id} is not in" in capsys.readouterr().err
    assert job2.run_id not in ("", job1.run_id) and state(run_dir)["run_id"] == job2.run_id
    assert history(server.uri, job2.run_id) == [(s, float(s)) for s in range(1, 5)]


def test_a_store_that_says_no_is_not_retried_and_says_so_once(server: Server, tmp_path: Path, capsys: Capture) -> None:
    mlflow = client(server.uri)
    mlflow.delete_experiment(mlflow.create_experiment("deleted-experiment"))
    job = start(tmp_path / "a", TrackingConfig(uri=server.uri, experiment="deleted-experiment"), resume_step=0)
    log_steps(job, range(1, 3))
    assert timed(lambda: job.finish()) < 5  # not flush_timeout_s (10 s): nothing to wait for
    err = capsys.readouterr().err
    assert "MLflow experiment 'deleted-experiment' is deleted" in err and "2 metric records" in err

    job = start(tmp_path / "b", TrackingConfig(uri=server.uri, experiment="deleted-run"), resume_step=0)
    log_steps(job, range(1, 2))
    wait_for(lambda: state(tmp_path / "b")["sent_records"] == 1)
    mlflow.delete_run(job.run_id)  # by hand, while the job runs
    log_steps(job, range(2, 5))
    assert timed(lambda: job.finish()) < 5
    err = capsys.readouterr().err
    assert err.count("refused metric values") == 1 and "refused the run status" in err
    assert "has not received" not in err and state(tmp_path / "b")["sent_records"] == 4  # skipped, not retried


def test_a_store_named_differently_continues_the_run_it_holds(server: Server, tmp_path: Path, capsys: Capture) -> None:
    run_dir = tmp_path / "run"
    job1 = start(run_dir, TrackingConfig(uri=server.uri, experiment="alias"), resume_step=0, name="alias")
    log_steps(job1, range(1, 3))
    job1.finish()
    alias = f"http://localhost:{server.port}/"
    job2 = start(run_dir, TrackingConfig(uri=alias, experiment="alias"), resume_step=2, name="alias")
    log_steps(job2, range(3, 4))
    job2.finish()
    assert f"tracking.uri names http://localhost:{server.port}" in capsys.readouterr().err
    assert job2.run_id == job1.run_id and state(run_dir)["uri"] == alias.rstrip("/")
    assert history(server.uri, job1.run_id) == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_the_checkpoints_run_id_is_continued_for_run_directories_from_before_mlflow_run_json(
        server: Server, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job1 = start(run_dir, TrackingConfig(uri=server.uri, experiment="old"), resume_step=0, name="old")
    log_steps(job1, range(1, 3))
    job1.finish()
    # As an older largessl left it: the run id only in the checkpoint, lines without timestamps (so sending them
    # again would add second values).
    (run_dir / "mlflow_run.json").unlink()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": r["step"], "loss": r["loss"]}) + "\n"
                                                   for r in lines(run_dir)))
    job2 = start(run_dir, TrackingConfig(experiment="old"), resume_step=2, name="old",
                 fallback_run_id=job1.run_id, fallback_uri=server.uri)
    log_steps(job2, range(3, 4))
    job2.finish()
    assert job2.run_id == job1.run_id and job2.uri == server.uri
    assert history(server.uri, job1.run_id) == [(1, 1.0), (2, 2.0), (3, 3.0)]  # what it had is not sent again


def test_evaluation_logs_to_the_run_in_mlflow_run_json(server: Server, tmp_path: Path) -> None:
    from largessl.tracking import attach_recorded

    run_dir = tmp_path / "run"
    job = start(run_dir, TrackingConfig(uri=server.uri, experiment="eval"), resume_step=0)
    job.finish()
    states = {"mlflow_run_id": "", "tracking_uri": ""}  # a checkpoint saved while the store was down
    tracker = attach_recorded(TrackingConfig(experiment="eval"), run_dir, states)
    tracker.log_metrics({"knn_top1": 0.25}, 7)
    tracker.finish()
    assert tracker.run_id == job.run_id
    assert history(server.uri, job.run_id, "knn_top1") == [(7, 0.25)]
    assert client(server.uri).get_run(job.run_id).info.status == "FINISHED"
    dead = f"http://127.0.0.1:{free_port()}"
    began = time.monotonic()
    attached = Tracker.attach(dead, job.run_id)
    attached.log_metrics({"knn_top1": 0.5}, 8)
    attached.finish()
    assert time.monotonic() - began < 5 and attached.run_id == ""


# ----------------------------------------------------------------------------- local stores and files


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make `path` unwritable for real. The tests run as root, for whom permission bits do not count, so then
    the file or directory is made immutable (chattr +i), which stops root too; as another user, chmod a-w."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("needs chattr +i (root on a filesystem with immutable files)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def refused(cfg: TrackingConfig, **kw: Path) -> str:
    began = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        check_store(cfg, **kw)
    assert time.monotonic() - began < 0.2
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_an_unwritable_sqlite_store_is_refused_at_once_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = f"sqlite:////nonexistent-dir-{os.getpid()}/x.db"
    assert refused(TrackingConfig(uri=missing)) == (
        f"tracking.uri: {missing} cannot be written: directory /nonexistent-dir-{os.getpid()} does not exist; set "
        "tracking.uri to a writable sqlite:////PATH/mlflow.db or a server's http://HOST:PORT, or "
        "tracking.enabled=false")
    (tmp_path / "file").write_text("")
    assert f"{tmp_path / 'file'} is not a directory" in refused(TrackingConfig(uri="sqlite:///file/x.db"))
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        assert f"cannot create files in {locked}" in refused(TrackingConfig(uri=f"sqlite:///{locked}/x.db"))
        monkeypatch.chdir(locked)  # MLflow's default store: mlflow.db in the working directory
        message = refused(TrackingConfig())
        assert message.startswith("MLflow's default store (tracking.uri and $MLFLOW_TRACKING_URI unset): "
                                  f"sqlite:///{locked}/mlflow.db cannot be written")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
        assert refused(TrackingConfig()).startswith(f"$MLFLOW_TRACKING_URI: sqlite:///{locked}/mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    db = tmp_path / "ro.db"
    db.write_bytes(b"")
    with read_only(db):
        assert f"{db} cannot be written" in refused(TrackingConfig(uri=f"sqlite:///{db}"))
    assert "tracking.flush_timeout_s: must be seconds, >= 0" in refused(TrackingConfig(flush_timeout_s=-1))
    writable = tmp_path / "writable"
    writable.mkdir()
    for fine in (TrackingConfig(uri=f"sqlite:///{writable}/x.db"), TrackingConfig(uri=missing, enabled=False),
                 TrackingConfig(uri=f"http://127.0.0.1:{free_port()}")):
        assert timed(lambda cfg=fine: check_store(cfg)) < 0.2
    assert list(writable.iterdir()) == []  # the probe leaves nothing behind


def test_a_store_that_fails_after_check_store_stalls_nothing_and_raises_nothing(
        tmp_path: Path, capsys: Capture) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "mlflow_run.json").write_text(json.dumps(
        {"run_id": "0123abcd", "uri": f"sqlite:///{locked}/mlflow.db", "experiment": "x", "sent_records": 0}))
    with read_only(locked):
        assert "the run's MLflow store" in refused(TrackingConfig(), run_dir=run_dir)
        check_store(TrackingConfig())  # without the run directory it cannot know that store
        tracker = start(run_dir, TrackingConfig(flush_timeout_s=30), resume_step=0)
        log_steps(tracker, range(1, 3))
        assert timed(lambda: tracker.finish()) < 1  # gave up at once: nothing to wait for
    err = capsys.readouterr().err
    assert f"sqlite:///{locked}/mlflow.db cannot be written" in err and "2 metric records" in err
    assert [r["step"] for r in lines(run_dir)] == [1, 2]

    import mlflow.tracking  # noqa: F401  # the thread's first MLflow import (2 s on 2 cores) is not what is timed

    garbage = tmp_path / "garbage.db"  # writable, but not a database: SQLite only finds out when it reads it
    garbage.write_bytes(b"not a database" * 100)
    # 3 s: the thread must reach the store (SQLAlchemy on a file that is not a database) and fail within the flush
    # timeout, on two cores shared with another test process (`make test`); with 1 s it sometimes only timed out.
    cfg = TrackingConfig(uri=f"sqlite:///{garbage}", flush_timeout_s=3)
    check_store(cfg)
    tracker = start(tmp_path / "run2", cfg, resume_step=0)
    log_steps(tracker, range(1, 4))
    assert timed(lambda: tracker.finish()) < 4.5
    err = capsys.readouterr().err
    assert "failed" in err and "3 metric records" in err
    assert [r["step"] for r in lines(tmp_path / "run2")] == [1, 2, 3]


def kind(uri: str, experiment: str) -> str | None:
    return client(uri).get_experiment_by_name(experiment).tags.get("mlflow.experimentKind")


def test_experiments_are_model_training_experiments_unless_they_have_a_kind(tmp_path: Path, capsys: Capture) -> None:
    """MLflow 3's UI shows an experiment without mlflow.experimentKind as a GenAI one (no metric columns)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow = client(uri)
    mlflow.create_experiment("old")  # as an earlier largessl created it
    mlflow.create_experiment("genai", tags={"mlflow.experimentKind": "genai_development"})
    for experiment in ("new", "old", "genai"):
        job = start(tmp_path / experiment, TrackingConfig(uri=uri, experiment=experiment), resume_step=0)
        log_steps(job, range(1, 3))
        job.finish()
        assert history(uri, job.run_id) == [(1, 1.0), (2, 2.0)]
    assert [kind(uri, e) for e in ("new", "old", "genai")] == [
        "custom_model_development", "custom_model_development", "genai_development"]
    mlflow.delete_experiment_tag(mlflow.get_experiment_by_name("old").experiment_id, "mlflow.experimentKind")
    resumed = start(tmp_path / "old", TrackingConfig(uri=uri, experiment="old"), resume_step=2)
    resumed.finish()  # continues its run: the run's experiment gets the tag too
    assert kind(uri, "old") == "custom_model_development"
    assert "warning:" not in capsys.readouterr().err


def test_a_failure_to_tag_the_experiment_is_said_once_and_the_run_goes_on(
        tmp_path: Path, capsys: Capture, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    def fail(*_args: object) -> None:
        raise MlflowException("tags are read-only here")  # INTERNAL_ERROR: neither a refusal nor an outage

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client(uri).create_experiment("untagged")
    monkeypatch.setattr(MlflowClient, "set_experiment_tag", fail)
    job = start(tmp_path / "run", TrackingConfig(uri=uri, experiment="untagged", flush_timeout_s=30), resume_step=0)
    log_steps(job, range(1, 4))
    assert timed(lambda: job.finish()) < 5
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(err) == 1 and "mlflow.experimentKind" in err[0] and "tags are read-only here" in err[0], err
    assert client(uri).get_run(job.run_id).info.status == "FINISHED" and kind(uri, "untagged") is None
    assert history(uri, job.run_id) == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_the_browse_hint_works_as_printed_outside_the_virtual_environment(tmp_path: Path) -> None:
    beside = Path(sys.executable).parent / "mlflow"
    assert beside.is_file()  # this venv's bin/mlflow
    spaced = f"sqlite:///{tmp_path}/my runs/mlflow.db"
    for uri in (f"sqlite:///{tmp_path}/mlflow.db", spaced, "file:///data/mlruns"):
        hint = browse_hint(uri, "abc123")
        assert hint.startswith(f"MLflow run abc123 in {uri}; browse it with: ")
        command, then = hint.split("browse it with: ")[1].split("  ")
        assert shlex.split(command) == [str(beside), "ui", "--backend-store-uri", uri]
        assert then == "(then open http://127.0.0.1:5000/#/runs/abc123)"
    assert f"'{spaced}'" in browse_hint(spaced, "r")
    version = subprocess.run(shlex.split(command)[0] + " --version", shell=True, capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin"}, timeout=60)  # no venv on PATH
    assert version.returncode == 0 and "version" in version.stdout, version.stderr
    assert browse_hint("http://host:5000/", "r1") == "MLflow run r1: open http://host:5000/#/runs/r1"
    assert browse_hint("https://mlflow.example.org/base", "r1").endswith("open https://mlflow.example.org/base/#/runs/r1")
    assert browse_hint("databricks", "r1") == "MLflow run r1 in databricks"


def test_without_mlflow_beside_python_the_hint_runs_it_as_a_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/opt/my python/bin/python3")
    command = browse_hint("sqlite:////data/mlflow.db", "r1").split("browse it with: ")[1].split("  ")[0]
    assert shlex.split(command) == ["/opt/my python/bin/python3", "-m", "mlflow", "ui", "--backend-store-uri",
                                    "sqlite:////data/mlflow.db"]


def test_tracking_off_still_owns_metrics_jsonl_and_creates_no_mlflow_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = TrackingConfig(enabled=False)
    job1 = start(run_dir, cfg, resume_step=0)
    log_steps(job1, range(1, 5))
    job1.log_artifact(run_dir / "missing.yaml")  # nothing to do, nothing said
    job1.finish()
    assert [r["step"] for r in lines(run_dir)] == [1, 2, 3, 4]
    job2 = start(run_dir, cfg, resume_step=2)
    assert [r["step"] for r in lines(run_dir)] == [1, 2]
    log_steps(job2, range(3, 4))
    job2.finish()
    job2.finish()  # a second finish does nothing
    assert [r["step"] for r in lines(run_dir)] == [1, 2, 3]
    assert (job2.run_id, job2.uri) == ("", "")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["metrics.jsonl", "run"]
    assert not [t for t in threading.enumerate() if t.name.startswith("largessl-mlflow")]
    start(run_dir, cfg, resume_step=0).finish()
    assert (run_dir / "metrics.jsonl").read_text() == ""  # a run from scratch starts an empty file


def test_resuming_keeps_sent_records_true_to_the_kept_lines(tmp_path: Path, capsys: Capture) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [json.dumps({"step": s, "timestamp": 1000 + s, "loss": float(s)}) for s in range(1, 6)]
    (run_dir / "metrics.jsonl").write_text("\n".join(records) + '\n{"step": 6, "lo')  # killed mid-line
    (run_dir / "mlflow_run.json").write_text(json.dumps(
        {"run_id": "r1", "uri": "http://127.0.0.1:1", "experiment": "x", "sent_records": 5}))
    start(run_dir, TrackingConfig(enabled=False), resume_step=3).finish()
    assert (run_dir / "metrics.jsonl").read_text() == "\n".join(records[:3]) + "\n"
    assert state(run_dir) == {"run_id": "r1", "uri": "http://127.0.0.1:1", "experiment": "x", "sent_records": 3}
    assert "1 unreadable line" in capsys.readouterr().err
    assert not list(run_dir.glob(".*"))  # no temporary files left


def test_log_metrics_appends_one_flushed_json_line_per_call(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    tracker = start(run_dir, TrackingConfig(enabled=False), resume_step=0)
    before = int(time.time() * 1000)
    tracker.log_metrics({"loss": 0.5, "knn_top1": 1}, 7)
    record = lines(run_dir)[0]  # read by another handle before finish: flushed
    assert set(record) == {"step", "timestamp", "loss", "knn_top1"}
    assert (record["step"], record["loss"], record["knn_top1"]) == (7, 0.5, 1.0)
    assert before <= record["timestamp"] <= int(time.time() * 1000)
    tracker.finish()


def test_the_default_store_is_mlflows_default(tmp_path: Path) -> None:
    import mlflow

    assert resolve_uri(TrackingConfig()) == mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_uri(TrackingConfig(uri="sqlite:///x.db")) == f"sqlite:///{tmp_path}/x.db"
    assert resolve_uri(TrackingConfig(), "http://h:5000/") == "http://h:5000"


# ----------------------------------------------------------------------------- through the training command


def test_training_with_the_server_down_at_start_reaches_one_run_on_resume(
        server: Server, mini_shards: Path, tmp_path: Path) -> None:
    """The whole first job runs with nothing listening (it trains, and says what it could not send); the resumed
    job, with the server up, delivers both jobs' steps to one MLflow run, with its params and artifacts."""
    from conftest import run_largessl

    gate = Gate(server.port)
    common = ["pretrain", "--config", "debug/mae_vit_tiny", f"data.train={mini_shards}", "run.name=late",
              f"tracking.uri={gate.uri}", "tracking.experiment=late", "tracking.flush_timeout_s=1",
              "trainer.log_every=1", "trainer.ckpt_every=2"]
    first = run_largessl([*common, "trainer.max_steps=3"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    # 3 progress lines and the job's last cpu_hours (its checkpoint's time included)
    assert "has not received 4 metric records" in first.stderr, first.stderr[-3000:]
    gate.open()
    try:
        second = run_largessl([*common, "trainer.max_steps=5"], tmp_path)
    finally:
        gate.close()
    assert second.returncode == 0, second.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("late").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "late"
    assert client.get_experiment_by_name("late").tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"MLflow run {runs[0].info.run_id}: open {gate.uri}/#/runs/{runs[0].info.run_id}" in second.stdout
    assert runs[0].data.params["trainer.ckpt_every"] == "2"
    assert {"config.yaml", "ds_config.json"} <= {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss"))
    assert steps == [1, 2, 3, 4, 5], steps  # the first job ended with a checkpoint of step 3: nothing repeated
    state = json.loads((tmp_path / "runs" / "late" / "mlflow_run.json").read_text())
    # 5 steps, the resume's record and each job's last cpu_hours
    assert state["run_id"] == runs[0].info.run_id and state["sent_records"] == 8
    resumes = client.get_metric_history(runs[0].info.run_id, "resumes")
    assert [(m.step, m.value) for m in resumes] == [(3, 1.0)]  # the history shows the restart and its step
    assert runs[0].data.tags["resumes"] == "1"
