"""The first minutes with the command: errors before torch is imported and within two seconds, --print-config
without data paths, help that lists the recipes, the config sections and each option's default."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, child_env, run_largessl

from largessl.config.load import list_recipes

HEAVY = ("torch", "torchvision", "timm", "deepspeed", "mlflow", "webdataset")
DEBUG = ["pretrain", "--config", "debug/mae_vit_tiny"]


def largessl_command() -> list[str]:
    """The console script a user runs (the venv's bin/largessl), else `python -m largessl`."""
    script = Path(sys.executable).parent / "largessl"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "largessl"]


def run_cli(args: list[str], workdir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*largessl_command(), *args], cwd=workdir, env=env or child_env(workdir),
                          capture_output=True, text=True, timeout=120)


def imported_after(args: list[str], workdir: Path) -> tuple[int, list[str], str]:
    """(exit code, heavy modules imported, stderr) of `largessl ARGS` run in-process in a fresh interpreter."""
    probe = ("import json, sys\nfrom largessl.cli import main\ncode = main(sys.argv[1:])\n"
             f"print(json.dumps([code, [m for m in {HEAVY!r} if m in sys.modules]]))\n")
    result = subprocess.run([sys.executable, "-c", probe, *args], cwd=workdir, env=child_env(workdir),
                            capture_output=True, text=True, timeout=120)
    code, heavy = json.loads(result.stdout.strip().splitlines()[-1])
    return code, heavy, result.stderr


def one_error_line(result: subprocess.CompletedProcess | str) -> str:
    err = result if isinstance(result, str) else result.stderr
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("largessl: error: "), err
    return lines[0]


def no_dataset_json(tmp_path: Path) -> str:
    folder = tmp_path / "not_a_dataset"
    folder.mkdir(exist_ok=True)
    return str(folder)


BAD_INPUTS = [
    (["optm.base_lr=1"], "unknown config key 'optm.base_lr' (did you mean 'optim.base_lr'?)"),
    (["distributed.zero_stage=7"], "distributed.zero_stage: must be 0, 1, 2 or 3"),
    (["data.train=/no/such/dir"], "data.train: dataset directory '/no/such/dir' does not exist"),
    (["data.train=NOT_A_DATASET"], "has no dataset.json"),
    (["data.train=MINI", "data.train_split=nope"], "has no split 'nope' (it has: train, val)"),
    (["data.train=MINI", "eval.knn_every=5", "data.val=", "eval.knn_val="], "eval.knn_val: needs a dataset"),
    (["data.train=MINI", "eval.knn_every=5", "eval.knn_val=/no/such/dir"], "eval.knn_val: dataset directory"),
    (["data.train="], "data.train: is required"),
    (["data.train=MINI", "distributed.precision=bf16"], "distributed.zero_stage: 0 cannot accumulate bf16 gradients"),
    (["data.train=MINI", "data.num_workers=10", "data.micro_batch_size=64", "optim.global_batch_size=64"],
     "data.train: 500 samples cannot fill one batch of 64 for each of 10 readers (1 ranks x 10 workers)"),
    (["data.train=MINI", "data.order=global", "optim.global_batch_size=512", "data.micro_batch_size=64"],
     "data.train: 500 samples cannot fill one global batch of 512"),
]


def resolved(overrides: list[str], mini: Path, tmp_path: Path) -> list[str]:
    return [o.replace("NOT_A_DATASET", no_dataset_json(tmp_path)).replace("MINI", str(mini)) for o in overrides]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS)
def test_config_and_dataset_errors_come_before_torch(overrides: list[str], message: str, mini_shards: Path,
                                                     tmp_path: Path) -> None:
    code, heavy, err = imported_after([*DEBUG, *resolved(overrides, mini_shards, tmp_path)], tmp_path)
    assert code == 2
    assert message in one_error_line(err)
    assert heavy == [], f"imported {heavy} before reporting: {err}"


def test_unknown_recipe_and_eval_errors_come_before_torch(mini_shards: Path, tmp_path: Path) -> None:
    code, heavy, err = imported_after(["pretrain", "--config", "debug/mae_vit_tny"], tmp_path)
    line = one_error_line(err)
    assert code == 2 and heavy == [] and "(did you mean 'debug/mae_vit_tiny'? shipped: debug/" in line
    assert all(name in line for name in list_recipes())
    knn = ["eval", "knn", "--train", str(mini_shards), "--val", str(mini_shards)]
    code, heavy, err = imported_after([*knn, "--checkpoint", str(tmp_path)], tmp_path)
    assert code == 2 and heavy == [] and "is not a run directory (no config.yaml)" in one_error_line(err)
    (tmp_path / "config.yaml").write_text("{}\n")
    code, heavy, err = imported_after([*knn, "--checkpoint", str(tmp_path)], tmp_path)
    assert code == 2 and heavy == [] and "no complete checkpoint under" in one_error_line(err)


def test_errors_are_reported_within_two_seconds(mini_shards: Path, tmp_path: Path) -> None:
    """The whole command, as a user runs it: interpreter start, config, dataset check, the line (best of 3)."""
    cases = [[*DEBUG, "optm.base_lr=1"], [*DEBUG, "data.train=/no/such/dir"],
             [*DEBUG, f"data.train={mini_shards}", "data.train_split=nope"]]
    for args in cases:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            result = run_cli(args, tmp_path)
            times.append(time.perf_counter() - start)
            assert result.returncode == 2
            one_error_line(result)
        assert min(times) < 2.0, f"{args}: {min(times):.2f} s"


def test_print_config_of_every_shipped_recipe_needs_no_data_paths(tmp_path: Path) -> None:
    from largessl.config.load import config_from_yaml_text

    recipes = list_recipes()
    assert len(recipes) >= 8
    for name in recipes:
        result = run_cli(["pretrain", "--config", name, "data.train=", "data.val=", "--print-config"], tmp_path)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        cfg = config_from_yaml_text(result.stdout, name)
        assert cfg.data.train == "" and cfg.run.name == Path(name).name


def test_pretrain_help_lists_the_recipes_and_the_sections(tmp_path: Path) -> None:
    result = run_cli(["pretrain", "--help"], tmp_path)
    assert result.returncode == 0
    for name in list_recipes():
        assert f"  {name}  " in result.stdout
    for section in ("model", "objective", "data", "optim", "trainer", "distributed", "run", "tracking", "eval"):
        assert f"\n  {section} " in result.stdout
    assert "base_lr, min_lr, global_batch_size" in result.stdout and "local_crops" in result.stdout


@pytest.mark.parametrize("protocol", ["linear", "attentive", "finetune"])
def test_each_protocols_help_lists_its_keys(protocol: str, tmp_path: Path) -> None:
    import dataclasses

    from largessl.eval.protocol_config import PROTOCOL_CONFIGS

    result = run_cli(["eval", protocol, "--help"], tmp_path)
    assert result.returncode == 0
    listed = result.stdout.split("config keys", 1)[1]
    keys = [f.name for f in dataclasses.fields(PROTOCOL_CONFIGS[protocol]) if f.name != "name"]
    assert len(keys) >= 5 and all(f" {key}," in listed or f" {key}\n" in listed for key in keys), listed


def test_eval_knn_help_shows_each_default(tmp_path: Path) -> None:
    result = run_cli(["eval", "knn", "--help"], tmp_path)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for expected in ("neighbours that vote (default: 20)", "(default: 0.07)", "split of --train (default: train)",
                     "split of --val (default: val)", "feature-extraction batch (default: 128)"):
        assert expected in text


def test_readme_commands_work_from_a_plain_shell(tmp_path: Path) -> None:
    """The README says to activate the venv; its bin/ has the `largessl` and `mlflow` the README names."""
    readme = (REPO / "README.md").read_text()
    assert ". .venv/bin/activate" in readme.split("## ")[0]
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "activate").is_file():
        pytest.skip("the tests do not run from a virtual environment")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"
    shell = f". {bin_dir / 'activate'} && command -v largessl && command -v mlflow && largessl pretrain --help"
    result = subprocess.run(["bash", "-c", shell], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(bin_dir / "largessl") in result.stdout and "shipped recipes" in result.stdout
    assert shutil.which("largessl", path=str(bin_dir))


def test_under_torchrun_our_error_line_is_each_failed_ranks_root_cause(tmp_path: Path) -> None:
    """torchrun's failure summary shows the line we printed (from $TORCHELASTIC_ERROR_FILE) for every rank that
    failed with it (exit code 2), never "error_file: <N/A>", and the root cause is one of them; a rank that did not
    print it (a config error every rank finds alike: rank 0 says it) still records it. A rank that torchrun
    stopped first, before it reached the error, is shown as stopped by the signal, as it was."""
    import re

    done = run_largessl(["pretrain", "--config", "debug/mae_vit_tiny", "trainer.max_steps=-1"], tmp_path, nproc=2,
                        timeout=300)
    assert done.returncode != 0
    ours = "largessl: error: trainer.max_steps: must be > 0"
    assert done.stderr.splitlines().count(ours) == 1, done.stderr[-3000:]  # printed by rank 0 only
    assert "Root Cause" in done.stderr, done.stderr[-3000:]
    block = r"rank\s*: (\d+) .*?\n\s*exitcode\s*: (-?\d+).*?\n\s*error_file: (\S+)\n\s*traceback : ([^\n]*)"
    blocks = re.findall(block, done.stderr, flags=re.S)
    failed = {rank: (error_file, traceback) for rank, code, error_file, traceback in blocks if code == "2"}
    assert failed and all(error_file != "<N/A>" and traceback == ours for error_file, traceback in failed.values()), \
        done.stderr[-3000:]
    root = done.stderr[done.stderr.index("Root Cause"):]
    assert f"traceback : {ours}" in root and "exitcode  : 2" in root, done.stderr[-3000:]
    others = {rank: code for rank, code, _, _ in blocks if code != "2"}
    assert all(code == "-15" for code in others.values()), done.stderr[-3000:]  # stopped by torchrun, if at all
