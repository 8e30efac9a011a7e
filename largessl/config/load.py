"""Resolve a recipe name or path plus overrides into a validated PretrainConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from largessl.config.loader import build, merge, parse_overrides, read_yaml, to_dict
from largessl.config.schema import PretrainConfig
from largessl.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_OBJECTIVE = "mae"


def list_recipes() -> list[str]:
    return sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))


def find_recipe(name_or_path: str) -> Path:
    """A path to a YAML file, or a shipped recipe name such as 'debug/mae_vit_tiny'."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / (name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml")
    if shipped.is_file():
        return shipped
    raise ConfigError(f"--config: no file '{name_or_path}' and no shipped recipe of that name "
                      f"(shipped: {', '.join(list_recipes())})")


def _objective_config_class(section: Any) -> type:
    from largessl.objectives import OBJECTIVES

    name = section.get("name", DEFAULT_OBJECTIVE) if isinstance(section, dict) else DEFAULT_OBJECTIVE
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name: unknown objective '{name}' (choose one of {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name].Config


def load_config(name_or_path: str, overrides: list[str] | None = None) -> PretrainConfig:
    """Defaults < recipe YAML < `key=value` overrides; validated; run.name defaults to the recipe's stem."""
    recipe = find_recipe(name_or_path)
    tree = merge(read_yaml(recipe), parse_overrides(overrides or []))
    tree.setdefault("objective", {})
    cfg = build(PretrainConfig, tree, choose=lambda name, section: _objective_config_class(section))
    if not cfg.run.name:
        cfg.run.name = recipe.stem
    cfg.validate()
    return cfg


def dump_config(cfg: PretrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_from_yaml_text(text: str) -> PretrainConfig:
    """Rebuild a resolved config (a run directory's config.yaml)."""
    tree = yaml.safe_load(text)
    return build(PretrainConfig, tree, choose=lambda name, section: _objective_config_class(section))
