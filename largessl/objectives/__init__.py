"""What is learned: one file and one class per method, registered here by name."""

from largessl.objectives.base import Objective
from largessl.objectives.dino import DINO
from largessl.objectives.mae import MAE

OBJECTIVES: dict[str, type[Objective]] = {"mae": MAE, "dino": DINO}

__all__ = ["OBJECTIVES", "Objective"]
