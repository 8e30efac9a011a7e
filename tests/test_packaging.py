"""`pip install .` (or a wheel) is a complete install: the wheel setuptools builds from a copy of the tracked tree
holds every module, recipe and DeepSpeed config of the tree, and an installed copy of it finds its evaluation
recipes (the failure this guards against: `largessl eval linear` said "no shipped recipe of that name (shipped: )"
when largessl.configs.eval was left out of the package list)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO


def tracked(*patterns: str) -> set[str]:
    listed = subprocess.run(["git", "ls-files", "-z", *patterns], cwd=REPO, capture_output=True, check=True)
    return {name for name in listed.stdout.decode().split("\0") if name}


def test_the_wheel_holds_every_module_recipe_and_config_of_the_tree(tmp_path: Path) -> None:
    source = tmp_path / "src"
    for name in tracked():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((REPO / name).read_bytes())
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("largessl-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    expected = {name for name in tracked("largessl", "data_tools") if name.endswith((".py", ".yaml", ".json"))}
    expected |= {f"largessl/ds_configs/{Path(name).name}" for name in tracked("ds_configs") if name.endswith(".json")}
    assert not expected - inside, sorted(expected - inside)
    assert {"largessl/configs/eval/linear.yaml", "largessl/configs/pretrain/cae_vith14.yaml"} <= inside

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
