"""`pip install .` (or a wheel) is a complete install: the wheel setuptools builds from a copy of the tracked tree
holds every module, recipe and DeepSpeed config of the tree, and an installed copy of it finds its evaluation
recipes (the failure this guards against: `largessl eval linear` said "no shipped recipe of that name (shipped: )"
when largessl.configs.eval was left out of the package list). A real `pip install ".[dalle]"` into a fresh virtual
environment gives a `largessl` command that works outside the checkout (docs/install.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from conftest import REPO


def tracked(*patterns: str) -> set[str]:
    listed = subprocess.run(["git", "ls-files", "-z", *patterns], cwd=REPO, capture_output=True, check=True)
    return {name for name in listed.stdout.decode().split("\0") if name}


def copy_tracked_tree(target: Path) -> Path:
    """The checkout's files that git tracks or would track (not ignored), as they are in the work tree, copied to
    `target`: what a clone holds once new files are added."""
    for name in tracked() | tracked("--others", "--exclude-standard"):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes((REPO / name).read_bytes())
    return target


def test_the_wheel_holds_every_module_recipe_and_config_of_the_tree(tmp_path: Path) -> None:
    source = copy_tracked_tree(tmp_path / "src")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("largessl-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    expected = {name for name in tracked("largessl", "data_tools") if name.endswith((".py", ".yaml", ".json"))}
    expected |= {f"largessl/ds_configs/{Path(name).name}" for name in tracked("ds_configs") if name.endswith(".json")}
    assert not expected - inside, sorted(expected - inside)
    assert {"largessl/configs/eval/linear.yaml", "largessl/configs/pretrain/cae_vith14.yaml"} <= inside
    license_file = next(name for name in inside if name.endswith(".dist-info/licenses/LICENSE"))
    metadata = zipfile.ZipFile(wheel).read(next(n for n in inside if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert zipfile.ZipFile(wheel).read(license_file) == (REPO / "LICENSE").read_bytes()

    target = tmp_path / "site"  # the wheel's files alone (no dependencies): the recipes are found from there
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    probe = ("from largessl.config.load import list_recipes, RECIPES_DIR\n"
             "print(RECIPES_DIR); print(len(list_recipes('eval')), len(list_recipes()))")
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                           capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr[-3000:]
    where, counts = found.stdout.split()[0], found.stdout.split()[1:]
    assert where.startswith(str(target))
    assert counts == [str(len(tracked("largessl/configs/eval"))), str(len(tracked("largessl/configs/pretrain",
                                                                                   "largessl/configs/debug")))]


def test_pip_install_with_an_extra_gives_a_working_command_outside_the_checkout(tmp_path: Path) -> None:
    """`pip install "<tree>[dalle]"` into a new virtual environment, then the installed `largessl` run from a
    directory that is not the checkout. The dependencies (torch, DeepSpeed, MLflow, dall-e, ...) are the test venv's,
    made visible to the new environment through a .pth file instead of downloaded again: pip installs with
    --no-index, so it must find every requirement, the extra's included, already satisfied. The test venv's own
    largessl (an editable install of the checkout) is left out of what the new environment sees, so the largessl
    there can only be the one pip installed."""
    deps_site = Path(sysconfig.get_path("purelib"))
    if not (deps_site / "dall_e").is_dir():
        # make install / make test install the dev extra, which holds dall-e; without it --no-index cannot work
        raise AssertionError(f"dall-e is not installed in {deps_site}: run make install first")
    deps = tmp_path / "deps"  # the test venv's site-packages minus its largessl, one symlink per entry
    deps.mkdir()
    for entry in deps_site.iterdir():
        if entry.name.startswith(("largessl", "__editable__", "data_tools")) or entry.suffix == ".pth":
            continue
        (deps / entry.name).symlink_to(entry)

    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)  # the interpreter the test venv was made from
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not key.startswith("PIP_")}
    env.update(OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    # no pip of its own: the test venv's pip (and setuptools, for the build) run through the .pth below
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, env=env, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], env=env,
                               capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    assert site.is_relative_to(venv), site
    (site / "largessl-test-deps.pth").write_text(f"{deps}\n")

    source = copy_tracked_tree(tmp_path / "src")
    work = tmp_path / "elsewhere"  # neither the checkout nor the source copy: nothing to import from by accident
    work.mkdir()
    done = subprocess.run([python, "-m", "pip", "install", "--no-index", "--no-build-isolation",
                           f"{source}[dalle]"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Successfully installed largessl-0.1.0" in done.stdout, done.stdout[-3000:]
    assert "Requirement already satisfied: dall-e==0.1" in done.stdout, done.stdout[-3000:]  # the extra resolved
    assert not (deps_site / "largessl").exists()  # the test venv was not written to (its largessl is editable)

    def run(*command: object) -> str:
        result = subprocess.run([str(c) for c in command], cwd=work, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{command}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
        return result.stdout

    largessl = venv / "bin" / "largessl"  # the console script pip wrote, started by the new environment's python
    head = "\n".join(largessl.read_text().splitlines()[:3])  # '#!python', or pip's /bin/sh wrapper for long paths
    assert str(python) in head, head
    linear_help = run(largessl, "eval", "linear", "--help")
    # the evaluation recipes are found in the installed package (empty before largessl.configs.eval was packaged)
    for recipe in ("eval/linear ", "eval/linear_dino ", "eval/attentive ", "eval/finetune_vith14 "):
        assert recipe in linear_help, linear_help
    assert "objective: checkpoint, checkpoint_step, num_classes" in linear_help, linear_help  # the protocol's keys

    recipe = run(largessl, "pretrain", "--config", "pretrain/cae_vith14", "--print-config")
    for line in ("name: vit_huge_patch14", "name: cae", "epoch_samples: 1281167", "epochs: 1600.0",
                 "global_batch_size: 2048", "zero_stage: 3"):
        assert f"  {line}\n" in recipe, recipe

    probe = ("import importlib.metadata as m, largessl, data_tools\n"
             "from largessl.config.load import RECIPES_DIR\n"
             "from largessl.distributed.config import DistributedConfig\n"
             "from largessl.distributed.engine import deepspeed_config, ds_config_path\n"
             "print(largessl.__file__); print(data_tools.__file__); print(RECIPES_DIR)\n"
             "print(ds_config_path(DistributedConfig(zero_stage=3, offload=True)))\n"
             "ds = deepspeed_config(DistributedConfig(zero_stage=3), micro_batch=16, accumulation=4, world_size=32,"
             " grad_clip=3.0)\n"
             "print(ds['zero_optimization']['stage'], ds['train_batch_size'])\n"
             "print(m.distribution('largessl').locate_file(''))\n"
             "print(m.requires('largessl'))\n")
    where = run(python, "-c", probe).splitlines()
    for line in where[:4]:  # module, data tools, recipes and DeepSpeed JSON all come from the new environment
        assert line.startswith(str(site)), where
    assert where[3] == str(site / "largessl" / "ds_configs" / "zero3_offload.json"), where
    assert where[4] == "3 2048", where
    assert Path(where[5]) == site, where  # the installed distribution's metadata, not the test venv's
    requires = where[6]
    assert "dall-e==0.1; extra == \"dalle\"" in requires and "deepspeed" in requires, requires
