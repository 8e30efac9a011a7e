"""Checkpoint naming, discovery and pruning, and the per-rank state our checkpoints carry.

DeepSpeed writes the weights and optimizer partitions; we add a client state (design.md "Run directory"):
step, samples seen, every reader's data position, RNG states, the MLflow run. DeepSpeed stores the client
state from rank 0 only, so per-rank parts are gathered into lists indexed by rank.
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

TAG = re.compile(r"step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag DeepSpeed's `latest` file names, if it exists and its directory is there."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def model_states_file(tag_dir: Path) -> Path:
    """Rank 0's model file of a DeepSpeed checkpoint (with the client state); ZeRO-3 names it differently."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise FileNotFoundError(tag_dir / "mp_rank_00_model_states.pt")


def resolve_tag_dir(path: Path) -> Path:
    """A run directory, its checkpoints/ directory or one tag directory -> the tag directory to read."""
    for ckpt_dir in (path / "checkpoints", path):
        tag = latest_tag(ckpt_dir)
        if tag:
            return ckpt_dir / tag
    with contextlib.suppress(FileNotFoundError):
        model_states_file(path)
        return path
    raise FileNotFoundError(path)


def prune(ckpt_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` step_* checkpoints (never the one `latest` names); returns removed."""
    current = latest_tag(ckpt_dir)
    tags = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and TAG.match(p.name)),
                  key=lambda p: int(TAG.match(p.name)[1]))
    removed = [p for p in tags[:-keep] if p.name != current]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
