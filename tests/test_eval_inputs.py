"""Every evaluation checks what it is given before it reports a number (eval/labels.py, eval/source.py).

- The class lists of the two splits: every protocol (k-NN, linear, attentive, fine-tune, few-shot) and a training
  job's k-NN monitor refuse, in one line and before any work, a val split with a class the train split lacks; a val
  split whose classes are a named subset of the train split's is scored with its labels mapped by class name, and
  its k-NN top-1 is the one the same images get inside the whole val split.
- An export is data: no store, server or path its metadata or embedded config names is contacted or created; the
  result is logged where the command line, the environment or the default says.
- A malformed export (its embedded config, its step, its metadata) or run config is one line and exit code 2, fast,
  never a traceback, never executed, never a huge allocation.

One real MAE run (2 steps, a SQLite MLflow store) and its export, made once for the module; datasets of some of the
bundled Imagenette classes written by data_tools. The commands run in this process (cli.main), in a scratch
working directory without $MLFLOW_TRACKING_URI, so MLflow's default store would be ./mlflow.db there.
"""

from __future__ import annotations

import http.server
import json
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import MINI_IMAGES, run_largessl, write_shards
from test_train import mlflow_client, ok

from largessl.cli import main as cli_main

CLASSES = sorted(p.name for p in (MINI_IMAGES / "train").iterdir())
SUBSET = [CLASSES[2], CLASSES[5], CLASSES[7]]  # val labels 0, 1, 2 are the train split's 2, 5, 7


@dataclass
class Setup:
    workdir: Path
    run_dir: Path
    export: Path  # the .safetensors file
    store: str  # the run's MLflow store
    shards: Path  # all ten classes
    first5: Path  # classes 0-4, train and val
    last5: Path  # classes 5-9, val
    subset: Path  # SUBSET, val


def class_dataset(out: Path, classes: list[str], splits: tuple[str, ...]) -> Path:
    """A dataset of the bundled images of `classes` only (data_tools imagefolder over copies of their folders)."""
    for split in splits:
        folder = out.parent / f"{out.name}-{split}-images"
        for name in classes:
            shutil.copytree(MINI_IMAGES / split / name, folder / name)
        write_shards(folder, out, split, 128)
    return out


@pytest.fixture(scope="module")
def setup(mini_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    workdir = tmp_path_factory.mktemp("evalinputs")
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    ok(run_largessl(["pretrain", "--config", "debug/mae_vit_tiny", f"data.train={mini_shards}",
                     f"data.val={mini_shards}", "run.name=mae", "model.image_size=32", "trainer.max_steps=2",
                     "trainer.ckpt_every=2", "eval.knn_every=0", "data.micro_batch_size=8",
                     "optim.global_batch_size=8", "data.num_workers=0", f"tracking.uri={store}"], workdir))
    run_dir = workdir / "runs" / "mae"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert cli_main(["export", str(run_dir)]) == 0
    (export,) = (run_dir / "export").glob("*.safetensors")
    datasets = workdir / "datasets"
    return Setup(workdir, run_dir, export, store, mini_shards,
                 class_dataset(datasets / "first5", CLASSES[:5], ("train", "val")),
                 class_dataset(datasets / "last5", CLASSES[5:], ("val",)),
                 class_dataset(datasets / "subset", SUBSET, ("val",)))


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory of its own, without $MLFLOW_TRACKING_URI."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`largessl ARGV` in this process: (exit code, stdout, stderr)."""
    code = cli_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str) -> str:
    """The single error line of a refused command (exit code 2, no traceback)."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("largessl: error: "), err
    return lines[0]


def knn(checkpoint: Path, train: Path, val: Path, *extra: str) -> list[str]:
    return ["eval", "knn", "--checkpoint", str(checkpoint), "--train", str(train), "--val", str(val),
            "--num-workers", "0", "--batch-size", "100", *extra]


# ----------------------------------------------------------------------------- class lists

PROTOCOLS = ["knn", "linear", "attentive", "finetune", "fewshot"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_protocol_refuses_val_classes_the_train_split_lacks_before_any_work(
        protocol: str, setup: Setup, scratch: Path, capsys: pytest.CaptureFixture) -> None:
    for val, missing in ((setup.last5, "5 of its 5 classes"), (setup.shards, "5 of its 10 classes")):
        argv = ["eval", protocol, "--checkpoint", str(setup.export), "--train", str(setup.first5), "--val", str(val)]
        started = time.monotonic()
        line = one_line_error(*run_cli(argv, capsys)[::2])
        assert f"--val: {missing} are not among --train's 5 ({CLASSES[5]!r}, {CLASSES[6]!r}, {CLASSES[7]!r} and " \
               "2 more); a label is a position in its own dataset's class list" in line, line
        assert time.monotonic() - started < 5  # before features, a model or a trainer
    assert not (setup.export.parent / f"{setup.export.stem}_eval").exists()  # nothing written, nothing cached


def test_a_training_jobs_knn_monitor_refuses_them_before_it_starts(setup: Setup, tmp_path: Path) -> None:
    done = run_largessl(["pretrain", "--config", "debug/mae_vit_tiny", f"data.train={setup.shards}",
                         "model.image_size=32", "trainer.max_steps=2", "eval.knn_every=1",
                         f"eval.knn_train={setup.first5}", f"eval.knn_val={setup.last5}", "tracking.enabled=false",
                         "run.name=monitor"], tmp_path)
    line = one_line_error(done.returncode, done.stderr)
    assert "eval.knn_val: 5 of its 5 classes are not among eval.knn_train's 5" in line
    assert not (tmp_path / "runs" / "monitor" / "checkpoints").exists()


def test_a_val_split_of_named_train_classes_is_scored_with_labels_mapped_by_name(
        setup: Setup, scratch: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    from largessl.eval.knn import knn_top1
    from largessl.eval.standalone import checkpoint_features

    code, out, err = run_cli(knn(setup.export, setup.shards, setup.subset), capsys)
    assert code == 0, err
    assert "--val: its classes are 3 of --train's 10 classes; its labels are mapped to --train's by class name" in out
    result = json.loads(next((setup.export.parent / f"{setup.export.stem}_eval").glob("knn_step*.json")).read_text())
    (train, (val_x, val_y)), _, _, _ = checkpoint_features(setup.export, str(setup.shards), str(setup.shards),
                                                           train_split="train", val_split="val", batch_size=100,
                                                           num_workers=0)
    chosen = torch.isin(val_y, torch.tensor([CLASSES.index(name) for name in SUBSET]))
    assert result["num_val"] == int(chosen.sum()) == 60
    expected = knn_top1(train, (val_x[chosen], val_y[chosen]), k=20, temperature=0.07)
    unmapped = knn_top1(train, (val_x[chosen], torch.searchsorted(torch.tensor([2, 5, 7]), val_y[chosen])), k=20,
                        temperature=0.07)
    assert result["knn_top1"] == pytest.approx(expected, abs=1e-9) and expected > unmapped
    assert f"knn_top1: {expected:.4f}" in out


def test_the_label_map_of_real_splits(setup: Setup) -> None:
    from largessl.data.index import open_split
    from largessl.eval.labels import label_map

    train = open_split(str(setup.shards), "train")
    assert label_map(train, open_split(str(setup.subset), "val"), ("t", "v")) == (2, 5, 7)
    assert label_map(train, open_split(str(setup.shards), "val"), ("t", "v")) is None  # one dataset.json
    first5 = open_split(str(setup.first5), "val")
    assert label_map(open_split(str(setup.first5), "train"), first5, ("t", "v")) is None
    assert label_map(train, first5, ("t", "v")) == (0, 1, 2, 3, 4)


# ----------------------------------------------------------------------------- an export is data


def edit_export(src: Path, dst: Path, change: Callable[[dict], None]) -> Path:
    """A copy of the export `src` whose safetensors header `change` edited (the weights untouched)."""
    data = src.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])
    return dst


def edit_config(change: Callable[[dict], None]) -> Callable[[dict], None]:
    """A header edit that changes the embedded run config (parsed and dumped again)."""
    def edit(header: dict) -> None:
        meta = header["__metadata__"]
        tree = yaml.safe_load(meta["largessl_config"])
        change(tree)
        meta["largessl_config"] = yaml.safe_dump(tree)
    return edit


@pytest.fixture
def listener() -> Iterator[list[str]]:
    """An HTTP server on 127.0.0.1 that records every request's path (answering 500)."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            seen.append(self.path)
            self.send_error(500)

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    seen.append(f"http://127.0.0.1:{server.server_port}")
    yield seen
    server.shutdown()


def test_an_exports_store_and_server_are_never_contacted_nor_created(
        setup: Setup, scratch: Path, listener: list[str], capsys: pytest.CaptureFixture) -> None:
    url, evil = listener[0], scratch / "elsewhere" / "evil.db"

    def steer(header: dict) -> None:
        header["__metadata__"]["tracking_uri"] = f"sqlite:///{evil}"
        edit_config(lambda tree: tree["tracking"].update(uri=url))(header)

    export = edit_export(setup.export, scratch / "shared.safetensors", steer)
    code, out, err = run_cli(knn(export, setup.shards, setup.shards), capsys)
    assert code == 0, err
    assert listener == [url] and not evil.parent.exists()  # no request, no file, no folder
    assert not (scratch / "mlflow.db").exists()  # the default store is looked in, never created
    assert (scratch / "shared_eval").is_dir() and "logged knn_top1" not in out
    code, out, err = run_cli(["eval", "linear", "--checkpoint", str(export), "--train", str(setup.shards), "--val",
                              str(setup.shards), "--print-config"], capsys)
    assert code == 0, err
    assert yaml.safe_load(out)["tracking"]["uri"] == ""  # the evaluation run's store: ours, not the file's
    code, out, err = run_cli(knn(export, setup.shards, setup.shards, "--tracking-uri", setup.store), capsys)
    assert code == 0, err
    run_id = json.loads((setup.run_dir / "mlflow_run.json").read_text())["run_id"]
    assert f"logged knn_top1 to MLflow run {run_id}" in out  # the run id the export names, in the store we chose
    assert [m.step for m in mlflow_client(setup.store).get_metric_history(run_id, "knn_top1")][-1] == 2
    assert listener == [url]


# ----------------------------------------------------------------------------- malformed exports and configs

MALFORMED = {
    "a model that is not a ViT": (edit_config(lambda t: t["model"].update(name="resnet50")), "model.name"),
    "an image size of 160000": (edit_config(lambda t: t["model"].update(image_size=160000)),
                                "model.image_size: 160000 must be in [16, 4096]"),
    "an image size of 0": (edit_config(lambda t: t["model"].update(image_size=0)), "model.image_size: 0 must be"),
    "an unknown key": (edit_config(lambda t: t["model"].update(layers=3)), "model.layers"),
    "a step that is not a number": (lambda h: h["__metadata__"].update(step="abc"), "names step 'abc', not a step"),
    "a negative step": (lambda h: h["__metadata__"].update(step="-1"), "names step '-1', not a step number"),
    "a python tag": (lambda h: h["__metadata__"].update(
        largessl_config="model: !!python/object/apply:os.system ['touch PWNED']\n"), "not a valid run config"),
    "a config that is a list": (lambda h: h["__metadata__"].update(largessl_config="[1, 2]"),
                                "not a valid run config (a mapping of sections, not list)"),
    "metadata that is not strings": (lambda h: h.update(__metadata__={"largessl_config": 3}),
                                     "its metadata is not a map of strings"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_export_is_one_line_and_exit_code_2(case: str, setup: Setup, scratch: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    change, said = MALFORMED[case]
    export = edit_export(setup.export, scratch / "bad.safetensors", change)
    for argv in (knn(export, setup.shards, setup.shards),
                 ["eval", "linear", "--checkpoint", str(export), "--train", str(setup.shards), "--val",
                  str(setup.shards)]):
        started = time.monotonic()
        line = one_line_error(*run_cli(argv, capsys)[::2])
        assert line.startswith(f"largessl: error: --checkpoint: {export}") and said in line, line
        assert time.monotonic() - started < 5
    assert not (scratch / "PWNED").exists()


def test_a_malformed_run_config_is_one_line_and_exit_code_2(setup: Setup, scratch: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    run_dir = scratch / "copy"
    shutil.copytree(setup.run_dir, run_dir)
    tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    tree["model"]["image_size"] = 160000
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tree))
    line = one_line_error(*run_cli(knn(run_dir, setup.shards, setup.shards), capsys)[::2])
    assert f"--checkpoint: {run_dir / 'config.yaml'}: model.image_size: 160000 must be in [16, 4096]" in line
    (run_dir / "config.yaml").write_text("model: [unclosed\n")
    line = one_line_error(*run_cli(knn(run_dir, setup.shards, setup.shards), capsys)[::2])
    assert "config.yaml: not a valid run config" in line
