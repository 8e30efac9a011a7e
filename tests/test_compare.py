"""`largessl compare` on real runs: two MAE settings and DINO trained through the real command into one SQLite
store (one of them through a real `mlflow server` on the same store), one of them resumed."""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import child_env, free_port, run_largessl, serve_mlflow

from largessl.cli import main
from largessl.tracking.usage import device_hours, read_jobs

EXPERIMENT = "cmp"
SMALL_DINO = ["model.image_size=32", "objective.local_crop_size=16", "objective.local_crops=2",
              "objective.out_dim=1024"]


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train(shards: Path, workdir: Path, recipe: str, name: str, uri: str, *extra: str) -> Path:
    ok(run_largessl(["pretrain", "--config", recipe, f"data.train={shards}", f"data.val={shards}", f"run.name={name}",
                     f"tracking.uri={uri}", f"tracking.experiment={EXPERIMENT}", "trainer.log_every=2",
                     "trainer.ckpt_every=2", *extra], workdir))
    return workdir / "runs" / name


@pytest.fixture(scope="module")
def store(mini_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """The runs, the SQLite store and a server over it. mae-a ran to step 4, lost its step-4 checkpoint (as if
    killed after logging step 4 but before saving it) and was resumed to step 6: its steps 3-4 were logged twice."""
    work = tmp_path_factory.mktemp("compare")
    sqlite = f"sqlite:///{work / 'mlflow.db'}"
    knn = ["eval.knn_every=2"]
    with serve_mlflow(work, sqlite) as server:
        run = train(mini_shards, work, "debug/mae_vit_tiny", "mae-a", sqlite, "trainer.max_steps=4", *knn)
        shutil.rmtree(run / "checkpoints" / "step_00000004")
        (run / "checkpoints" / "latest").write_text("step_00000002")
        train(mini_shards, work, "debug/mae_vit_tiny", "mae-a", sqlite, "trainer.max_steps=6", *knn)
        train(mini_shards, work, "debug/mae_vit_tiny", "mae-b", server, "trainer.max_steps=4",
              "objective.mask_ratio=0.5", *knn)
        train(mini_shards, work, "debug/dino_vit_tiny", "dino", sqlite, "trainer.max_steps=4", *SMALL_DINO)  # no k-NN
        yield {"work": work, "sqlite": sqlite, "server": server}


def compare(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["compare", "--experiment", EXPERIMENT, *args])
    out, err = capsys.readouterr()
    return code, out, err


def report(capsys: pytest.CaptureFixture, uri: str, *args: str) -> dict:
    code, out, err = compare(capsys, "--tracking-uri", uri, "--json", *args)
    assert code == 0, err
    return json.loads(out)


def history(uri: str, name: str, key: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    run = client.search_runs([experiment], filter_string=f"attributes.run_name = '{name}'")[0]
    return client.get_metric_history(run.info.run_id, key)


def test_rows_order_and_the_keys_that_differ(store: dict, capsys: pytest.CaptureFixture) -> None:
    result = report(capsys, store["sqlite"])
    rows = {row["run"]: row for row in result["rows"]}
    assert sorted(rows) == ["dino", "mae-a", "mae-b"]
    for name in ("mae-a", "mae-b"):  # best and last k-NN as MLflow holds them
        values = {m.step: m.value for m in history(store["sqlite"], name, "knn_top1")}
        assert rows[name]["best_knn_top1"] == pytest.approx(max(values.values()))
        assert rows[name]["last_knn_top1"] == pytest.approx(values[max(values)])
    best_first = [r["run"] for r in result["rows"][:2]]
    assert best_first == sorted(("mae-a", "mae-b"), key=lambda n: -rows[n]["best_knn_top1"])
    assert result["rows"][-1]["run"] == "dino" and rows["dino"]["best_knn_top1"] is None  # without the metric: last
    assert (rows["mae-a"]["steps"], rows["mae-a"]["max_steps"], rows["mae-b"]["steps"], rows["dino"]["steps"]) == \
        (6, 6, 4, 4)
    assert {r["method"] for r in rows.values()} == {"mae", "dino"} and {r["status"] for r in rows.values()} == \
        {"finished"}
    assert all(r["world_size"] == 1 and r["images_per_sec"] > 0 and r["gpu_hours"] > 0 for r in rows.values())
    order = [r["run"] for r in result["rows"]]
    diff = result["diff"]
    assert dict(zip(order, diff["objective.mask_ratio"], strict=True)) == {"mae-a": "0.75", "mae-b": "0.5",
                                                                           "dino": "-"}
    assert dict(zip(order, diff["objective.name"], strict=True)) == {"mae-a": "mae", "mae-b": "mae", "dino": "dino"}
    assert "eval.knn_every" in diff and "objective.out_dim" in diff
    assert not {"model.name", "run.name", "data.train", "trainer.log_every"} & set(diff)


def test_terminal_table(store: dict, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = compare(capsys, "--tracking-uri", store["sqlite"])
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("run "))
    table = lines[header + 2:header + 5]
    assert [line.split()[0] for line in table] == [r["run"] for r in report(capsys, store["sqlite"])["rows"]]
    assert table[-1].split()[7:9] == ["-", "-"]  # dino: no best, no last k-NN
    assert "objective.mask_ratio" in out and "only in dino: " in out and "objective.out_dim=1024" in out


def test_a_resumed_run_appears_once_with_its_whole_history(store: dict, capsys: pytest.CaptureFixture) -> None:
    row = next(r for r in report(capsys, store["sqlite"])["rows"] if r["run"] == "mae-a")
    raw = history(store["sqlite"], "mae-a", "loss")
    assert sorted(m.step for m in raw) == [2, 4, 4, 6]  # step 4 logged by both jobs
    logged_last = {m.step: m.value for m in sorted(raw, key=lambda m: m.timestamp)}
    assert row["curves"]["loss"] == [[step, pytest.approx(logged_last[step])] for step in (2, 4, 6)]
    jobs = read_jobs(store["work"] / "runs" / "mae-a")
    assert len(jobs) == 2 and row["gpu_hours"] == pytest.approx(device_hours(jobs), rel=1e-9)
    assert row["gpu_hours"] > device_hours(jobs[1:])  # the first job's time counts too


def test_a_server_gives_the_same_comparison(store: dict, capsys: pytest.CaptureFixture) -> None:
    direct, served = report(capsys, store["sqlite"]), report(capsys, store["server"])
    assert served["store"] == store["server"]
    assert served["rows"] == direct["rows"] and served["diff"] == direct["diff"]


def test_filter_and_runs_select(store: dict, capsys: pytest.CaptureFixture) -> None:
    mae = report(capsys, store["sqlite"], "--filter", "params.`objective.name` = 'mae'")
    assert sorted(r["run"] for r in mae["rows"]) == ["mae-a", "mae-b"]
    picked = report(capsys, store["server"], "--runs", "dino", mae["rows"][0]["run_id"])
    assert sorted(r["run"] for r in picked["rows"]) == sorted(["dino", mae["rows"][0]["run"]])


def test_png_html_and_csv(store: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from PIL import Image

    png, page, table = tmp_path / "runs.png", tmp_path / "runs.html", tmp_path / "runs.csv"
    code, out, err = compare(capsys, "--tracking-uri", store["sqlite"], "--plot", str(png), "--csv", str(table))
    assert code == 0, err
    assert compare(capsys, "--tracking-uri", store["sqlite"], "--plot", str(page))[0] == 0
    image = Image.open(png).convert("RGB")
    assert image.size == (1920, 624)
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 100  # not blank
    counts = dict((rgb, n) for n, rgb in colours)
    for tab10 in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):  # one colour per run, drawn
        assert counts.get(tab10, 0) > 200, tab10
    text = page.read_text()
    assert text.count("<table>") == 2 and "data:image/png;base64," in text
    assert all(f"<td>{name}</td>" in text for name in ("mae-a", "mae-b", "dino"))
    rows = list(csv.DictReader(table.open()))
    assert [r["run"] for r in rows] == [r["run"] for r in report(capsys, store["sqlite"])["rows"]]
    assert {"best_knn_top1", "gpu_hours", "objective.mask_ratio"} <= set(rows[0])


@pytest.mark.parametrize("args, message", [
    (["--experiment", "nosuch"], r"no experiment 'nosuch' in sqlite:///\S+; experiments there: Default, cmp$"),
    (["--experiment", "cmp", "--filter", "params.x = = 1"],
     r"--filter 'params.x = = 1': .*\(INVALID_PARAMETER_VALUE\)"),
    (["--experiment", "cmp", "--runs", "nobody"], r"--runs: no run 'nobody' among the selected runs \(.*dino.*\)$"),
    (["--experiment", "cmp", "--plot", "x.svg"], r"--plot x.svg: the file must end in .png or .html$"),
])
def test_bad_input_is_one_line(store: dict, capsys: pytest.CaptureFixture, args: list, message: str) -> None:
    code = main(["compare", "--tracking-uri", store["sqlite"], *args])
    out, err = capsys.readouterr()
    assert code == 2 and not out, out
    assert len(err.splitlines()) == 1 and re.fullmatch(f"largessl: error: {message}", err.strip()), err


def test_an_unreachable_server_or_a_missing_store_is_one_line(tmp_path: Path) -> None:
    for uri, message in ((f"http://127.0.0.1:{free_port()}", "did not answer (ConnectionRefusedError"),
                         (f"sqlite:///{tmp_path / 'none.db'}", f"no MLflow store at {tmp_path / 'none.db'}")):
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "largessl", "compare", "--experiment", "x",
                                 "--tracking-uri", uri], cwd=tmp_path, env=child_env(tmp_path), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("largessl: error: ") and message in result.stderr, result.stderr
        assert time.monotonic() - started < 60
    assert not (tmp_path / "none.db").exists()  # reading never creates a store


def test_a_run_still_training_is_marked_running(mini_shards: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "-m", "largessl", "pretrain", "--config", "debug/mae_vit_tiny",
               f"data.train={mini_shards}", f"data.val={mini_shards}", "run.name=live", f"tracking.uri={uri}",
               f"tracking.experiment={EXPERIMENT}",
               "trainer.max_steps=10000", "trainer.log_every=1"]
    job = subprocess.Popen(command, cwd=tmp_path, env=child_env(tmp_path), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        state = tmp_path / "runs" / "live" / "mlflow_run.json"
        deadline = time.monotonic() + 240
        while not (state.is_file() and json.loads(state.read_text() or "{}").get("sent_records", 0) >= 2):
            assert job.poll() is None and time.monotonic() < deadline, "the run did not start logging"
            time.sleep(1)
        row = report(capsys, uri)["rows"][0]
        assert (row["run"], row["status"]) == ("live", "running") and row["steps"] >= 1
        assert row["max_steps"] == 10000 and row["best_knn_top1"] is None
    finally:
        job.send_signal(signal.SIGTERM)
        job.wait(timeout=120)


def test_usage_sums_every_job_and_an_unwritable_file_is_said_once(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    from largessl.tracking.usage import Usage

    (tmp_path / "usage.json").write_text(json.dumps({"jobs": [{"start": 0.0, "end": 1800.0, "world_size": 8}]}))
    usage = Usage(tmp_path, world_size=4, started=time.time() - 900)
    assert usage.hours() == pytest.approx(8 * 0.5 + 4 * 0.25, abs=1e-3)  # 4 GPU-hours before, 1 in this job
    assert [j["world_size"] for j in read_jobs(tmp_path)] == [8, 4]
    (tmp_path / "usage.json").unlink()
    (tmp_path / "usage.json" / "x").mkdir(parents=True)  # a directory in its place: no user can replace it
    assert usage.hours() > 5 and usage.hours() > 5  # still counted, for this job's metric
    assert capsys.readouterr().err.count("warning: cannot write") == 1
