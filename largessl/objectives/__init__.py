"""What is learned: one file and one class per method, registered here by name."""

from largessl.objectives.base import Objective
from largessl.objectives.mae import MAE

OBJECTIVES: dict[str, type[Objective]] = {"mae": MAE}

__all__ = ["OBJECTIVES", "Objective"]
