"""Schedules stated in epochs: `trainer.epochs` for `trainer.max_steps`, `optim.warmup_epochs` for
`optim.warmup_steps`, `model.freeze_encoder_epochs` for `model.freeze_encoder_steps`, and the objective's own pairs
(DINO's teacher-temperature warmup and last-layer freeze).

A config sets exactly one key of each pair. The step counts are resolved when a run starts, with floor(epoch samples /
global batch) optimizer steps per epoch (the official MAE, DINO and CAE loops drop the last incomplete batch of each
epoch). An epoch is `trainer.epoch_samples` samples where a recipe states its epochs in a reference dataset's (the
shipped pretraining recipes: ImageNet-1k's 1,281,167, so 1600 epochs mean the same compute on ImageNet-22K), else
the training split's sample count in dataset.json. A command-line override of one key of a pair replaces the
recipe's other key, so `trainer.max_steps=50` shortens a recipe written in epochs.
"""

from __future__ import annotations

import copy
from typing import Any

from largessl.errors import ConfigError

# (section, key in epochs, key in optimizer steps)
PAIRS = (
    ("trainer", "epochs", "max_steps"),
    ("optim", "warmup_epochs", "warmup_steps"),
    ("objective", "warmup_teacher_temp_epochs", "warmup_teacher_temp_steps"),
    ("objective", "freeze_last_layer_epochs", "freeze_last_layer_steps"),
    ("model", "freeze_encoder_epochs", "freeze_encoder_steps"),
)


def settle_pairs(recipe: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Before the two trees are merged: refuse both keys of a pair in one of them, and let an override of one key
    drop the recipe's other key. Where epochs are given, the step key becomes null (resolved at start-up)."""
    for section, epochs, steps in PAIRS:
        for tree, where in ((recipe, "the recipe"), (overrides, "the overrides")):
            node = tree.get(section)
            if isinstance(node, dict) and node.get(epochs) is not None and node.get(steps) is not None:
                raise ConfigError(f"{section}.{epochs} and {section}.{steps} are both set in {where}; set one of them")
        given = overrides.get(section) if isinstance(overrides.get(section), dict) else {}
        node = recipe.get(section)
        if isinstance(node, dict):
            for key, other in ((epochs, steps), (steps, epochs)):
                if given.get(key) is not None:
                    node.pop(other, None)
    for tree in (recipe, overrides):
        for section, epochs, steps in PAIRS:
            node = tree.get(section)
            if isinstance(node, dict) and node.get(epochs) is not None:
                node[steps] = None


def check_pair(section: Any, prefix: str, epochs: str, steps: str) -> None:
    """Exactly one of the pair is set, and it is positive (steps may be 0 where 0 means none)."""
    e, s = getattr(section, epochs), getattr(section, steps)
    if (e is None) == (s is None):
        raise ConfigError(f"{prefix}.{steps}: set exactly one of {prefix}.{steps} and {prefix}.{epochs}")
    if e is not None and not e >= 0:
        raise ConfigError(f"{prefix}.{epochs}: must be >= 0, got {e}")


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    steps = num_samples // global_batch
    if steps == 0:
        raise ConfigError(f"optim.global_batch_size: {global_batch} is larger than an epoch ({num_samples} samples), "
                          "so an epoch has no step; lower it or set steps instead of epochs")
    return steps


def resolve(cfg: Any, num_samples: int) -> tuple[Any, list[str]]:
    """A copy of `cfg` with every step key of a pair given in epochs filled in; and one phrase per resolved key.
    An epoch is trainer.epoch_samples samples when set (a recipe's reference dataset), else the training split's
    `num_samples`."""
    resolved = copy.deepcopy(cfg)
    epoch = cfg.trainer.epoch_samples or num_samples
    per_epoch = 0
    said = []
    for section_name, epochs, steps in PAIRS:
        section = getattr(resolved, section_name)
        value = getattr(section, epochs, None)
        if value is None:
            continue
        per_epoch = per_epoch or steps_per_epoch(epoch, cfg.optim.global_batch_size)
        setattr(section, steps, round(value * per_epoch))
        said.append(f"{section_name}.{steps}={getattr(section, steps)} ({value:g} epochs)")
    if said:
        said.insert(0, f"{per_epoch} steps per epoch ({epoch} samples // {cfg.optim.global_batch_size}"
                       f"{reference(cfg.trainer.epoch_samples, num_samples)})")
    return resolved, said


def reference(epoch_samples: int | None, num_samples: int) -> str:
    """'' for epochs of the training split; else how trainer.epoch_samples's epoch compares with the split."""
    if not epoch_samples:
        return ""
    passes = epoch_samples / num_samples
    return f"; an epoch is trainer.epoch_samples, {passes:.3g} passes over data.train's {num_samples}"
