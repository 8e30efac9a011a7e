"""Config precedence, strict keys, value checks and the one-line error contract of the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from largessl.cli import main
from largessl.config.load import config_from_yaml_text, dump_config, list_recipes, load_config
from largessl.epochs import resolve
from largessl.errors import ConfigError

DEBUG = "debug/mae_vit_tiny"


def test_precedence_defaults_then_yaml_then_cli(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: {train: /x, micro_batch_size: 8}\noptim: {base_lr: 1.0e-3, global_batch_size: 32}\n")
    cfg = load_config(str(recipe), ["optim.base_lr=2e-3"])
    assert cfg.optim.weight_decay == 0.05  # default, untouched
    assert cfg.data.micro_batch_size == 8  # from YAML
    assert cfg.optim.base_lr == 2e-3  # CLI beats YAML ("2e-3" without a dot still parses as a number)
    assert cfg.run.name == "recipe"  # run.name defaults to the recipe's stem
    assert cfg.objective.name == "mae" and cfg.objective.mask_ratio == 0.75


def test_shipped_recipes_resolve() -> None:
    recipes = list_recipes()
    for name in ("debug/mae_vit_tiny", "pretrain/mae_vitb16", "pretrain/mae_vitl16", "pretrain/mae_vith14"):
        assert name in recipes
        cfg = load_config(name, ["data.train=/somewhere", "data.val=/somewhere"])
        assert cfg.objective.name == "mae"
    vith = load_config("pretrain/mae_vith14", ["data.train=/x", "data.val=/y"])
    assert (vith.model.name, vith.model.num_patches, vith.optim.global_batch_size) == ("vit_huge_patch14", 256, 4096)
    assert vith.distributed.zero_stage == 3 and vith.optim.betas == (0.9, 0.95)


def test_dino_recipes_resolve_with_the_papers_settings() -> None:
    for name in ("debug/dino_vit_tiny", "pretrain/dino_vits16", "pretrain/dino_vitb16", "pretrain/dino_vitl16"):
        cfg = load_config(name, ["data.train=/somewhere", "data.val=/somewhere"])
        assert cfg.objective.name == "dino"
        assert (cfg.objective.warmup_teacher_temp, cfg.objective.teacher_temp) == (0.04, 0.07)
        assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.04, 0.4)
        assert cfg.objective.teacher_momentum == 0.996 and cfg.objective.center_momentum == 0.9
    vitb = load_config("pretrain/dino_vitb16", ["data.train=/x", "data.val=/y"])
    assert (vitb.objective.out_dim, vitb.objective.local_crops, vitb.optim.peak_lr()) == (65536, 10, 2e-3)
    vits = load_config("pretrain/dino_vits16", ["data.train=/x", "data.val=/y"])
    assert vits.objective.local_crops == 8 and vits.objective.freeze_last_layer_epochs == 1
    assert resolve(vits, 1_281_167)[0].objective.freeze_last_layer_steps == 1251  # ImageNet-1k at 1024


@pytest.mark.parametrize(("override", "closest"), [
    ("optim.base_lrr=1e-3", "optim.base_lr"),
    ("trainer.max_step=10", "trainer.max_steps"),
    ("objective.mask_ration=0.5", "objective.mask_ratio"),
    ("data.micro_batch=4", "data.micro_batch_size"),
    ("optm.base_lr=1e-3", "optim.base_lr"),  # a misspelt section: the closest full dotted key
    ("trainr.max_steps=3", "trainer.max_steps"),
    ("distributd.zero_stage=3", "distributed.zero_stage"),
])
def test_unknown_key_names_the_closest_valid_key(override: str, closest: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown config key '{override.split('=')[0]}' \(did you mean '{closest}'"):
        load_config(DEBUG, [override])


def test_a_key_of_another_objective_names_that_objective() -> None:
    with pytest.raises(ConfigError, match=r"^objective.local_crops: a key of objective.name=dino; this config's "
                                          "objective is mae"):
        load_config(DEBUG, ["objective.local_crops=2"])
    with pytest.raises(ConfigError, match=r"^objective.mask_ratio: a key of objective.name=mae"):
        load_config("debug/dino_vit_tiny", ["objective.mask_ratio=0.5"])


def test_unknown_key_without_a_close_one_suggests_nothing() -> None:
    with pytest.raises(ConfigError, match=r"^unknown config key 'xyzzy.plugh'$"):
        load_config(DEBUG, ["xyzzy.plugh=1"])


def test_loading_a_config_imports_no_torch() -> None:
    probe = ("import sys\nfrom largessl.config.load import dump_config, load_config\n"
             "for name in ('debug/mae_vit_tiny', 'pretrain/dino_vitb16'):\n"
             "    dump_config(load_config(name, ['data.train=/x']))\n"
             "print(sorted(m for m in ('torch', 'torchvision', 'timm', 'deepspeed', 'numpy', 'PIL') "
             "if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("data: {train: /x}\ndistributed: {zero_stag: 3}\n")
    with pytest.raises(ConfigError, match="distributed.zero_stage"):
        load_config(str(recipe))


@pytest.mark.parametrize(("override", "message"), [
    ("distributed.zero_stage=5", "distributed.zero_stage: must be 0, 1, 2 or 3"),
    ("distributed.precision=fp8", "distributed.precision: must be one of bf16, fp16, fp32"),
    ("trainer.max_steps=abc", "trainer.max_steps: expected an integer"),
    ("objective.mask_ratio=1.5", "objective.mask_ratio: must be in"),
    ("model.name=vit_gigantic_patch16", "model.name: unknown model"),
    ("model.image_size=100", "model.image_size: 100 is not a multiple of the patch size 16"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer: must be >= 0"),
    ("optim.global_batch_size=100", "optim.global_batch_size: 100 is not a multiple of data.micro_batch_size"),
    ("objective.name=simclr", "objective.name: unknown objective 'simclr'"),
    ("tracking.enabled=maybe", "tracking.enabled: expected true or false"),
    ("optim.betas=[0.9]", "optim.betas: expected a list of 2 values"),
    ("distributed.offload=true", "distributed.offload: CPU offload is shipped for ZeRO-3 only"),
])
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(DEBUG, [override])
    assert str(error.value).startswith(message)


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(DEBUG, ["optim.base_lr"])


def test_missing_recipe_lists_shipped_ones() -> None:
    with pytest.raises(ConfigError, match="debug/mae_vit_tiny"):
        load_config("no/such/recipe")


def test_resolved_config_round_trips() -> None:
    cfg = load_config(DEBUG, ["optim.betas=[0.8, 0.9]", "objective.norm_pix_loss=false"])
    again = config_from_yaml_text(dump_config(cfg), "dumped")
    assert again == cfg


def test_cli_bad_config_is_one_line_and_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["pretrain", "--config", DEBUG, "optim.base_lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert "unknown config key 'optim.base_lrr' (did you mean 'optim.base_lr'?)" in err


def test_cli_bad_argument_is_one_line_and_exit_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--config" in err


def test_print_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["pretrain", "--config", DEBUG, "--print-config", "trainer.max_steps=7"]) == 0
    assert "max_steps: 7" in capsys.readouterr().out


def test_no_traceback_from_the_real_command(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "largessl", "pretrain", "--config", DEBUG, "model.name=vit_x"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("largessl: error: model.name: unknown model 'vit_x'")


def readme_key_table() -> dict[tuple[str, str], set[str]]:
    """README's key table: (section, objective names or '') -> the keys it lists (values in parentheses dropped)."""
    import re

    from conftest import REPO

    table = {}
    for section, objectives, keys in re.findall(r"^\| `(\w+)`(?: \(([^|]*?)\))? \| (.*) \|$",
                                                (REPO / "README.md").read_text(), re.M):
        depth, kept = 0, ""
        for char in keys:  # drop parenthesised values: `name` (`adamw`, `lars`) -> `name`
            depth += {"(": 1, ")": -1}.get(char, 0)
            kept += char if depth == 0 and char != ")" else ""
        for objective in re.findall(r"`(\w+)`", objectives.split(":")[0]) or [""]:
            table[(section, objective)] = set(re.findall(r"`(\w+)`", kept))
    return table


def test_the_readme_key_table_lists_every_key_pretrain_help_shows() -> None:
    import dataclasses
    import typing

    from largessl.config.load import OBJECTIVE_CONFIGS
    from largessl.config.schema import PretrainConfig

    table = readme_key_table()
    for section in dataclasses.fields(PretrainConfig):
        classes = (OBJECTIVE_CONFIGS.items() if section.name == "objective"
                   else [("", typing.get_type_hints(PretrainConfig)[section.name])])
        for objective, cls in classes:
            keys = {f.name for f in dataclasses.fields(cls)} - ({"name"} if objective else set())
            assert table.get((section.name, objective)) == keys, (section.name, objective)
