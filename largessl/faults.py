"""Fault injection for the fault campaign (benchmarks/fault_campaign.py), off unless $LARGESSL_FAULT is set.

LARGESSL_FAULT="rank=1 step=23 phase=optimizer step signal=SIGKILL delay=0.05" makes global rank 1 send itself
SIGKILL 0.05 s after it enters the phase "optimizer step" of step 23 (the phases are the watchdog's marks, plus
"MLflow delivery" on rank 0's tracking thread). Once per process. A signal from inside is what SLURM, the OOM
killer or an operator would send from outside, only at a moment the campaign chooses.
"""

from __future__ import annotations

import os
import signal
import threading

VARIABLE = "LARGESSL_FAULT"


def _parse(text: str) -> dict[str, str] | None:
    """'rank=1 step=23 phase=optimizer step signal=SIGKILL delay=0.05' -> fields (a phase may hold spaces)."""
    if not text:
        return None
    fields: dict[str, str] = {}
    key = ""
    for word in text.split():
        if "=" in word:
            key, value = word.split("=", 1)
            fields[key] = value
        elif key:
            fields[key] += f" {word}"
    return fields


_fault = _parse(os.environ.get(VARIABLE, ""))
_step = 0


def reached(phase: str, step: int | None = None) -> None:
    """This process enters `phase` (of `step`, when given): fire the fault if it is the one asked for."""
    global _fault, _step
    if _fault is None:
        return
    if step is not None:
        _step = step
    fault = _fault
    if phase != fault["phase"] or _step != int(fault["step"]) or os.environ.get("RANK", "0") != fault["rank"]:
        return
    _fault = None
    timer = threading.Timer(float(fault.get("delay", 0)), os.kill, (os.getpid(), signal.Signals[fault["signal"]]))
    timer.daemon = True
    timer.start()
