"""MLflow tracking survives a server that goes away and comes back (real `mlflow server` processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import free_port

from largessl.config.schema import TrackingConfig
from largessl.tracking import Tracker


def serve(root: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "art")],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(180):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(1)
    kill(server)
    raise RuntimeError("mlflow server did not start")


def kill(server: subprocess.Popen) -> None:
    """SIGKILL the server and its worker processes (a crash, not a shutdown)."""
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


def test_metrics_logged_while_the_server_is_down_arrive_later(tmp_path: Path, capsys) -> None:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = serve(tmp_path, port)
    try:
        tracker = Tracker.start(TrackingConfig(uri=uri, experiment="outage"), run_name="r", params={"a": 1}, tags={})
        tracker.log_metrics({"loss": 3.0}, 1)
        kill(server)
        tracker.log_metrics({"loss": 2.0}, 2)  # the server is gone: kept in memory
        tracker.log_metrics({"loss": 1.5}, 3)
        assert capsys.readouterr().err.count("MLflow logging failed") == 1  # said once, not per call
        server = serve(tmp_path, port)
        tracker.log_metrics({"loss": 1.0}, 4)
        assert "answers again" in capsys.readouterr().err
        tracker.finish()
        from mlflow.tracking import MlflowClient

        history = MlflowClient(uri).get_metric_history(tracker.run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [(1, 3.0), (2, 2.0), (3, 1.5), (4, 1.0)]
    finally:
        kill(server)
