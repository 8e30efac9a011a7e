"""What is learned: one file and one class per method, registered here by name.

Importing this package imports no torch: the config sections are in `config`, and a method's module is
imported when its class is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from largessl.objectives.config import OBJECTIVE_CONFIGS

if TYPE_CHECKING:
    from largessl.objectives.base import Objective

CLASSES = {"mae": "largessl.objectives.mae:MAE", "dino": "largessl.objectives.dino:DINO",
           "cae": "largessl.objectives.cae:CAE", "sim": "largessl.objectives.sim:SIM",
           # evaluation protocols run through the same trainer (largessl/eval)
           "linear": "largessl.eval.linear:LinearProbe", "attentive": "largessl.eval.attentive:AttentiveProbe",
           "finetune": "largessl.eval.finetune:FineTune"}
assert CLASSES.keys() == OBJECTIVE_CONFIGS.keys()


def objective_class(name: str) -> type[Objective]:
    """The Objective subclass registered as `name` (objective.name)."""
    module, _, attr = CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["CLASSES", "OBJECTIVE_CONFIGS", "objective_class"]
