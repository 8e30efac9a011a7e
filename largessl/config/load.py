"""Resolve a recipe name or path plus overrides into a validated PretrainConfig."""

from __future__ import annotations

import dataclasses
import difflib
import re
import textwrap
import typing
from pathlib import Path
from typing import Any

import yaml

from largessl.config.loader import build, merge, parse_overrides, read_yaml, to_dict
from largessl.config.schema import PretrainConfig
from largessl.epochs import settle_pairs
from largessl.errors import ConfigError
from largessl.objectives.config import OBJECTIVE_CONFIGS

RECIPES_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_OBJECTIVE = "mae"


def list_recipes(kind: str = "pretrain") -> list[str]:
    """Shipped recipe names: the pretraining ones, or with kind='eval' the evaluation protocols' (configs/eval/)."""
    names = sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))
    return [name for name in names if name.startswith("eval/") == (kind == "eval")]


def recipe_summary(name: str) -> str:
    """The first comment line of a shipped recipe (what it is)."""
    for line in (RECIPES_DIR / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return re.split(r"[:(]|\. ", line.lstrip("# "))[0].strip(" ,.")
    return ""


def config_help() -> str:
    """The shipped recipes and the config sections with their keys, for `largessl pretrain --help`."""
    recipes = [f"  {name:<22}{recipe_summary(name)}" for name in list_recipes()]
    sections = []
    for section in dataclasses.fields(PretrainConfig):
        classes = (list(OBJECTIVE_CONFIGS.values()) if section.name == "objective"
                   else [typing.get_type_hints(PretrainConfig)[section.name]])
        for cls in classes:
            keys = ", ".join(f.name for f in dataclasses.fields(cls) if not (section.name == "objective"
                                                                              and f.name == "name"))
            sections.append(f"  {section.name:<12}{(cls.__doc__ or '').strip()}")
            sections.append(textwrap.fill(keys, 118, initial_indent=" " * 14, subsequent_indent=" " * 14))
    return "\n".join(["shipped recipes (--config NAME):", *recipes, "",
                       "config sections (set any key as section.key=value; --print-config shows every value):",
                       *sections, "", "Each key's meaning is documented beside its default in the section's dataclass "
                       "(README: 'Pretraining')."])


def find_recipe(name_or_path: str, kind: str = "pretrain") -> Path:
    """A path to a YAML file, or a shipped recipe name such as 'debug/mae_vit_tiny' (of `kind`, for the hint)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / (name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml")
    if shipped.is_file():
        return shipped
    close = difflib.get_close_matches(name_or_path.removesuffix(".yaml"), list_recipes(kind), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"--config: no file '{name_or_path}' and no shipped recipe of that name "
                      f"({hint}shipped: {', '.join(list_recipes(kind))})")


def _objective_config_class(section: Any) -> type:
    name = section.get("name", DEFAULT_OBJECTIVE) if isinstance(section, dict) else DEFAULT_OBJECTIVE
    if name not in OBJECTIVE_CONFIGS:
        raise ConfigError(f"objective.name: unknown objective '{name}' (choose one of {', '.join(OBJECTIVE_CONFIGS)})")
    for key in section if isinstance(section, dict) else ():
        owners = [other for other, cls in OBJECTIVE_CONFIGS.items() if key in _field_names(cls)]
        if owners and name not in owners:
            raise ConfigError(f"objective.{key}: a key of objective.name={' or '.join(owners)}; this config's "
                              f"objective is {name}")
    return OBJECTIVE_CONFIGS[name]


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def load_config(name_or_path: str, overrides: list[str] | None = None) -> PretrainConfig:
    """Defaults < recipe YAML < `key=value` overrides; validated; run.name defaults to the recipe's stem."""
    recipe = find_recipe(name_or_path)
    return config_from_tree(read_yaml(recipe), overrides, default_name=recipe.stem)


def config_from_tree(base: dict[str, Any], overrides: list[str] | None, *, default_name: str) -> PretrainConfig:
    """A recipe's tree (as read from YAML, possibly completed by the caller) < overrides, validated."""
    given = parse_overrides(overrides or [])
    settle_pairs(base, given)
    tree = merge(base, given)
    tree.setdefault("objective", {})
    cfg = build(PretrainConfig, tree, choose=lambda name, section: _objective_config_class(section))
    if not cfg.run.name:
        cfg.run.name = default_name
    cfg.validate()
    return cfg


def dump_config(cfg: PretrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_from_yaml_text(text: str, source: str) -> PretrainConfig:
    """Rebuild a resolved config (a run directory's config.yaml, an export's embedded one), validated as a --config
    file is; anything wrong with it is one ConfigError line that starts with `source` (what the text came from)."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # a !!python/... tag is refused here too (safe_load constructs plain data only)
        problem = " ".join(str(getattr(exc, "problem", "") or type(exc).__name__).split())
        raise ConfigError(f"{source}: not a valid run config ({problem[:200]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: not a valid run config (a mapping of sections, not {type(tree).__name__})")
    try:
        cfg = build(PretrainConfig, tree, choose=lambda name, section: _objective_config_class(section))
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg
