"""`largessl compare` on real runs: two MAE settings and DINO trained through the real command into one SQLite
store (one of them through a real `mlflow server` on the same store), one of them resumed; runs that logged NaN and
+-inf and hold params and tags that are not numbers; paths that are not MLflow stores."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import sqlite3
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
    assert all(r["world_size"] == 1 and r["images_per_sec"] > 0 and r["device_hours"] > 0
               and r["device_hours_counted"] == "CPU jobs" for r in rows.values())  # CPU runs: cpu_hours, not GPU
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
    assert len(jobs) == 2 and row["device_hours"] == pytest.approx(device_hours(jobs), rel=1e-9)
    assert row["device_hours"] > device_hours(jobs[1:])  # the first job's time counts too


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
    assert {"best_knn_top1", "device_hours", "objective.mask_ratio"} <= set(rows[0])


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


# ----------------------------------------------------------------------------- values that are not numbers

NAN, INF = float("nan"), float("inf")
ODD = "odd"
HOUR_MS = 3_600_000
ODD_RUNS = {  # name: (metric histories, one value per step from 0; params; tags)
    "fine": ({"knn_top1": [0.2, 0.5, 0.4], "loss": [0.9, 0.5, 0.7], "gpu_hours": [0.25, INF, 0.5, NAN],
              "images_per_sec": [100.0, NAN, 300.0, INF, 500.0], "epoch": [NAN, 1.5], "linear_top1": [0.7]},
             {"trainer.max_steps": "inf"}, {"world_size": "nan"}),
    "nan-first": ({"knn_top1": [NAN, 0.1], "loss": [NAN, 0.2]}, {"trainer.max_steps": "nan"}, {"world_size": "inf"}),
    "plus-inf": ({"knn_top1": [0.3, INF], "loss": [INF, 1.0], "linear_top1": [NAN]}, {"trainer.max_steps": "abc"},
                 {"world_size": "-3"}),
    "minus-inf": ({"knn_top1": [-INF, 0.05], "loss": [-INF, 4.0], "linear_top1": [1e300]},
                  {"trainer.max_steps": "10", "derived.world_size": "2"}, {"max_steps": "1e400", "world_size": "x"}),
    "inf-only": ({"knn_top1": [INF], "loss": [-INF]}, {}, {"max_steps": "8.0", "world_size": "4"}),
    "only-nan": ({"knn_top1": [NAN, NAN], "loss": [NAN]}, {"trainer.max_steps": "0"}, {"world_size": "2.5"}),
    "absent": ({"gpu_hours": [NAN], "images_per_sec": [NAN, INF], "epoch": [INF]}, {"trainer.max_steps": "-5"}, {}),
}
COLUMNS = ["run", "method", "model", "status", "steps", "epochs", "world", "best", "last", "loss", "img/s", "device-h"]
ODD_TABLE = {  # --metric knn_top1, best first; then the extra columns knn... (none here), linear_top1
    "fine": ["4/?", "1.50", "-", "0.5000", "0.4000", "0.7000", "400.0", "0.500", "0.7000"],
    "plus-inf": ["1/?", "-", "-", "0.3000", "inf", "1.0000", "-", "1.000~", "nan"],
    "nan-first": ["1/?", "-", "-", "0.1000", "0.1000", "0.2000", "-", "1.000~", "-"],
    "minus-inf": ["1/10", "-", "2", "0.0500", "0.0500", "4.0000", "-", "2.000~", "1e+300"],
    "inf-only": ["0/8", "-", "4", "inf", "inf", "-inf", "-", "4.000~", "-"],  # not finite: after every finite one
    "only-nan": ["1/?", "-", "-", "nan", "nan", "nan", "-", "1.000~", "-"],
    "absent": ["1/?", "inf", "-", "-", "-", "-", "-", "1.000~", "-"],  # no knn_top1: last
}
LOSS_ORDER = ["nan-first", "fine", "plus-inf", "minus-inf", "inf-only", "only-nan", "absent"]


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite store whose runs logged NaN and +-inf (through MLflow's client, as the trainer does) and hold params
    and tags that are not counts. Every run lasted one hour by MLflow's clock."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('odd') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(ODD)
    start = int(time.time() * 1000) - 2 * HOUR_MS
    for name, (metrics, params, tags) in ODD_RUNS.items():
        run_id = client.create_run(experiment, start_time=start, run_name=name,
                                   tags={"method": "mae", "model": "vit_tiny", **tags}).info.run_id
        for key, values in metrics.items():
            for step, value in enumerate(values):
                client.log_metric(run_id, key, value, timestamp=start + step, step=step)
        for key, value in params.items():
            client.log_param(run_id, key, value)
        client.set_terminated(run_id, end_time=start + HOUR_MS)
    return uri


def no_constant(name: str) -> None:
    raise AssertionError(f"{name} in the JSON output: not JSON")


def table_rows(out: str) -> dict[str, list[str]]:
    """{run: its cells after the status} of the printed table, in the printed order."""
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("run "))
    cells = [line.split() for line in lines[header + 2:] if line.strip()][:len(ODD_RUNS)]
    return {c[0]: c[4:] for c in cells}


def test_infinities_are_stored_as_the_largest_float(odd: str) -> None:
    """What the tests below rely on: MLflow's SQL store gives +-inf back as +-1.797e308, NaN as NaN."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=odd)
    runs = {r.info.run_name: r.info.run_id for r in
            client.search_runs([client.get_experiment_by_name(ODD).experiment_id])}
    assert [m.value for m in client.get_metric_history(runs["minus-inf"], "loss")] == [-sys.float_info.max, 4.0]
    assert [m.value for m in client.get_metric_history(runs["plus-inf"], "knn_top1")] == [0.3, sys.float_info.max]
    assert all(m.value != m.value for m in client.get_metric_history(runs["only-nan"], "knn_top1"))


def test_non_finite_values_rank_after_finite_ones_and_show_as_words(odd: str, capsys: pytest.CaptureFixture) -> None:
    code, out, err = compare(capsys, "--experiment", ODD, "--tracking-uri", odd)
    assert code == 0 and not err, err
    header = next(line for line in out.splitlines() if line.startswith("run "))
    assert header.split() == [*COLUMNS[:7], "best", "knn_top1", "last", "knn_top1", *COLUMNS[9:], "linear_top1"]
    rows = table_rows(out)
    assert list(rows) == list(ODD_TABLE)
    assert rows == ODD_TABLE
    assert max(len(line) for line in out.splitlines()) < 160  # no 309-digit cell


def test_losses_rank_lowest_first_with_the_same_rules(odd: str, capsys: pytest.CaptureFixture) -> None:
    code, out, err = compare(capsys, "--experiment", ODD, "--tracking-uri", odd, "--metric", "loss")
    assert code == 0 and not err, err
    assert "best loss first (lower is better)" in out
    rows = table_rows(out)
    assert list(rows) == LOSS_ORDER
    best_last = {name: cells[3:5] for name, cells in rows.items()}
    assert best_last == {"nan-first": ["0.2000", "0.2000"], "fine": ["0.5000", "0.7000"],
                         "plus-inf": ["1.0000", "1.0000"], "minus-inf": ["4.0000", "4.0000"],
                         "inf-only": ["-inf", "-inf"], "only-nan": ["nan", "nan"], "absent": ["-", "-"]}


def test_json_holds_no_nan_literal_and_spells_non_finite_values(odd: str, capsys: pytest.CaptureFixture) -> None:
    code, out, err = compare(capsys, "--experiment", ODD, "--tracking-uri", odd, "--json")
    assert code == 0, err
    result = json.loads(out, parse_constant=no_constant)
    rows = {r["run"]: r for r in result["rows"]}
    assert [r["run"] for r in result["rows"]] == list(ODD_TABLE)
    assert (rows["only-nan"]["best_knn_top1"], rows["plus-inf"]["last_knn_top1"], rows["inf-only"]["last_loss"],
            rows["plus-inf"]["linear_top1"], rows["absent"]["epochs"]) == ("nan", "inf", "-inf", "nan", "inf")
    assert rows["plus-inf"]["curves"]["knn_top1"] == [[0, 0.3], [1, "inf"]]
    assert rows["minus-inf"]["curves"]["loss"] == [[0, "-inf"], [1, 4.0]]
    assert rows["nan-first"]["curves"]["loss"] == [[0, "nan"], [1, 0.2]]
    assert (rows["fine"]["best_knn_top1"], rows["fine"]["device_hours"], rows["fine"]["images_per_sec"]) == \
        (0.5, 0.5, 400.0)
    assert [(r["max_steps"], r["world_size"]) for r in result["rows"]] == \
        [(None, None), (None, None), (None, None), (10, 2), (8, 4), (None, None), (None, None)]
    assert (rows["absent"]["device_hours"], rows["absent"]["device_hours_counted"]) == (1.0, "wall clock")


def test_csv_holds_readable_values(odd: str, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    path = tmp_path / "odd.csv"
    code, _, err = compare(capsys, "--experiment", ODD, "--tracking-uri", odd, "--csv", str(path))
    assert code == 0, err
    rows = {r["run"]: r for r in csv.DictReader(path.open())}
    assert list(rows) == list(ODD_TABLE)
    assert [rows[n]["best_knn_top1"] for n in ODD_TABLE] == ["0.5", "0.3", "0.1", "0.05", "inf", "nan", ""]
    assert (rows["plus-inf"]["last_knn_top1"], rows["inf-only"]["last_loss"], rows["minus-inf"]["linear_top1"]) == \
        ("inf", "-inf", "1e+300")
    assert (rows["fine"]["max_steps"], rows["fine"]["world_size"], rows["minus-inf"]["max_steps"]) == ("", "", "10")
    numbers = [value for r in rows.values() for key, value in r.items() if key.endswith("_top1") and value]
    assert all(isinstance(float(value), float) and len(value) < 25 for value in numbers)


def test_plots_leave_non_finite_values_out(odd: str, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from largessl.compare import plot, runs

    png, page = tmp_path / "odd.png", tmp_path / "odd.html"
    for path in (png, page):
        code, _, err = compare(capsys, "--experiment", ODD, "--tracking-uri", odd, "--plot", str(path))
        assert code == 0 and path.stat().st_size > 10_000, err
    text = page.read_text()
    assert "<td>plus-inf</td>" in text and "<td>-inf</td>" in text and "<td>nan</td>" in text
    found = runs.fetch(odd, ODD, "", ["fine", "plus-inf"], "knn_top1")  # finite losses 0.5 to 1.0, and one inf
    loss_ax, _, metric_ax = plot.figure(found, ["fine", "plus-inf"], "knn_top1", "odd").axes[:3]
    assert loss_ax.get_yscale() == "linear"  # the inf is not "far apart" from the others
    low, high = loss_ax.get_ylim()
    assert 0.4 < low < 0.5 and 1.0 < high < 1.1
    low, high = metric_ax.get_ylim()
    assert 0.15 < low < 0.2 and 0.5 < high < 0.6


def test_smoothing_steps_over_non_finite_values() -> None:
    from largessl.compare.plot import smoothed

    values = smoothed([2.0] * 5 + [NAN, INF] + [2.0] * 5)
    assert values[5] != values[5] and values[6] != values[6]  # gaps
    assert values[:5] + values[7:] == pytest.approx([2.0] * 10)


# ----------------------------------------------------------------------------- paths that are not MLflow stores


def foreign_database(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.commit()


SQLITE_PATHS = {  # kind: (how g.db is made, what the error line says it is)
    "random bytes": (lambda p: p.write_bytes(b"\x00\x01not sqlite" + bytes(range(256)) * 16),
                     "is not an SQLite database"),
    "text": (lambda p: p.write_text("runs: 3\nthis is not a database\n"), "is not an SQLite database"),
    "empty": (Path.touch, "is an empty file"),
    "directory": (Path.mkdir, "is a directory"),
    "another program's database": (foreign_database,
                                   "is an SQLite database without MLflow's tables (another program's?)"),
}


def other_store(kind: str, where: Path) -> tuple[str, str]:
    """(--tracking-uri, the error line expected after 'largessl: error: ') for a file: path or URI that is no store."""
    if kind == "file: empty directory":
        return where.as_uri(), re.escape(f"{where} is not an MLflow store: it holds no experiment (no "
                                         "NUMBER/meta.yaml)")
    if kind == "file: a file":
        (where / "g.db").write_text("x")
        return (where / "g.db").as_uri(), re.escape(f"{where / 'g.db'} is a file, not an MLflow file store (a "
                                                    f"directory); a SQLite store is named sqlite:///{where / 'g.db'}")
    if kind == "file: missing":
        return (where / "mlruns").as_uri(), re.escape(f"no MLflow store at {where / 'mlruns'}")
    if kind == "sqlite: two slashes":
        return "sqlite://g.db", r"the MLflow store sqlite://g.db cannot be opened: Invalid SQLite URL: sqlite://g\.db"
    return "nosuch://host/x", r"the MLflow store nosuch://host/x cannot be opened: .*unsupported URI 'nosuch://host/x'.*"


def not_a_store(kind: str, where: Path) -> tuple[str, str]:
    """(--tracking-uri, the error line expected after 'largessl: error: ') for a kind of path that is no store."""
    if kind not in SQLITE_PATHS:
        return other_store(kind, where)
    make, what = SQLITE_PATHS[kind]
    make(where / "g.db")
    return f"sqlite:///{where / 'g.db'}", re.escape(f"{where / 'g.db'} {what}, not an MLflow store")


@pytest.mark.parametrize("kind", ["random bytes", "text", "empty", "directory", "another program's database",
                                  "file: empty directory", "file: a file", "file: missing", "sqlite: two slashes",
                                  "unknown scheme"])
def test_a_path_that_is_not_a_store_is_one_line_and_left_alone(kind: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    where = tmp_path / "here"
    where.mkdir()
    uri, message = not_a_store(kind, where)
    before = {p: p.read_bytes() for p in where.rglob("*") if p.is_file()}
    code, out, err = compare(capsys, "--tracking-uri", uri)
    assert code == 2 and not out and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and re.fullmatch(f"largessl: error: {message}", err.strip()), err
    assert {p: p.read_bytes() for p in where.rglob("*") if p.is_file()} == before  # nothing made, nothing changed


def test_random_bytes_as_a_store_in_a_new_process(tmp_path: Path) -> None:
    """The reported case as a user meets it: `largessl compare` on a file of random bytes."""
    (tmp_path / "g.db").write_bytes(os.urandom(8192).replace(b"SQLite", b"sqlite"))
    result = subprocess.run([sys.executable, "-m", "largessl", "compare", "--experiment", "x", "--tracking-uri",
                             "sqlite:///g.db"], cwd=tmp_path, env=child_env(tmp_path), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and not result.stdout, result.stderr
    assert result.stderr == f"largessl: error: {tmp_path / 'g.db'} is not an SQLite database, not an MLflow store\n"


def test_an_unreadable_store_is_one_line(odd: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if os.geteuid() == 0:  # root reads any file: /proc/self/mem is a regular file whose first bytes cannot be read
        path = Path("/proc/self/mem")
    else:
        path = tmp_path / "mlflow.db"
        shutil.copy(odd[len("sqlite:///"):], path)
        path.chmod(0)
    code, out, err = compare(capsys, "--tracking-uri", f"sqlite:///{path}")
    assert code == 2 and not out and len(err.splitlines()) == 1, err
    assert re.fullmatch(rf"largessl: error: MLflow store {path} cannot be read \([A-Za-z/ ]+\)", err.strip()), err


def test_a_store_that_cannot_be_written_is_still_read(odd: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Reading needs no write: an immutable store in an immutable directory (root cannot write either)."""
    where = tmp_path / "frozen"
    where.mkdir()
    shutil.copy(odd[len("sqlite:///"):], where / "mlflow.db")
    if subprocess.run(["chattr", "+i", str(where / "mlflow.db"), str(where)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here (not root, or the filesystem has no immutable files)")
    try:
        code, out, err = compare(capsys, "--experiment", ODD, "--tracking-uri", f"sqlite:///{where / 'mlflow.db'}")
    finally:
        subprocess.run(["chattr", "-i", str(where), str(where / "mlflow.db")], check=True)
    assert code == 0, err
    assert table_rows(out) == ODD_TABLE
