"""Typed configs from dataclass defaults < YAML recipe < dotted CLI overrides.

Every error is a ConfigError naming the dotted key (and, for an unknown key, the closest valid one).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from largessl.errors import ConfigError


def require(condition: bool, key: str, message: str) -> None:
    """Raise a ConfigError about `key` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def check_scale_range(scale: tuple[float, float], key: str) -> None:
    """A RandomResizedCrop area range: [low, high] with 0 < low <= high <= 1."""
    low, high = scale
    require(0 < low <= high <= 1, key, "must be [low, high] with 0 < low <= high <= 1")


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config dataclass."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += valid_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def unknown_key_error(key: str, value: Any, candidates: list[str]) -> ConfigError:
    """The error for an unknown `key` (holding `value`): it names the full dotted key as written (for a misspelt
    section, its first key: `optm.base_lr`) and the closest valid key, matched part by part (`optim.base_lr`)."""
    if isinstance(value, dict) and value:
        key = next(iter(flatten(value, f"{key}.")))
    close = closest_key(key, candidates)
    hint = f" (did you mean '{close}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def closest_key(key: str, candidates: list[str], cutoff: float = 0.5) -> str | None:
    """The candidate (or candidate section, for a key shorter than the candidates) most like `key`, each dotted
    part compared with the part in the same place; None if none is at least `cutoff` alike on average."""
    parts = key.split(".")
    shapes = {".".join(c.split(".")[:len(parts)]) for c in candidates if c.count(".") >= len(parts) - 1}

    def likeness(candidate: str) -> float:
        pairs = zip(parts, candidate.split("."), strict=True)
        return sum(difflib.SequenceMatcher(None, a, b).ratio() for a, b in pairs) / len(parts)

    best = max(sorted(shapes), key=likeness, default=None)
    return best if best is not None and likeness(best) >= cutoff else None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config field type {hint} for {key}")


def build(cls: type, data: dict[str, Any], prefix: str = "", choose: Any = None) -> Any:
    """Build dataclass `cls` from a nested dict, checking every key and value.

    `choose(field_name, data) -> type` picks the dataclass of a tagged-union section (the objective).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise unknown_key_error(f"{prefix}{key}", data[key], valid_keys(cls, prefix))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        hint = hints[f.name]
        sub_cls = choose(f.name, data[f.name]) if choose and hint is Any else hint
        if dataclasses.is_dataclass(sub_cls):
            kwargs[f.name] = build(sub_cls, data[f.name] or {}, f"{prefix}{f.name}.", choose)
        else:
            kwargs[f.name] = _coerce(data[f.name], hint, f"{prefix}{f.name}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a config (tuples become lists so YAML stays plain)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        else:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def merge(base: dict[str, Any], diff: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `diff` wins."""
    out = dict(base)
    for key, value in diff.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """["optim.base_lr=1e-3", "data.train=/shards"] -> nested dict (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return tree


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    return data
