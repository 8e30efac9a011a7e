"""What an evaluation starts from: a pretraining run directory's checkpoint, or a file `largessl export` wrote.

Every `largessl eval` command takes either as --checkpoint. A run directory gives its newest complete checkpoint
(or --step's), its config.yaml and the MLflow run its checkpoint names. An export (`--format safetensors`: the
.safetensors file; `--format timm`: its directory) carries the same in its safetensors metadata: the run's resolved
config, the step and the MLflow run, so the encoder is rebuilt with its method's layout and the timm-named weights
are mapped back to ours (models/timm_format.py) and loaded strictly. Results of an export go to EXPORT_eval/ beside
it (a run directory's go to RUN_DIR/eval/), and are logged onto the pretraining run where its store is reachable.

Everything here but `load_encoder` reads no weights and imports no torch, so a wrong path is said at once.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from largessl.checkpoint import checkpoint_of, step_of
from largessl.config.load import config_from_yaml_text
from largessl.config.schema import PretrainConfig, TrackingConfig
from largessl.errors import UserError

if TYPE_CHECKING:
    from torch import nn

CONFIG_KEY = "largessl_config"  # the run's resolved config.yaml, in the export's safetensors metadata
TIMM_DIR_FILE = "model.safetensors"  # what --format timm writes beside config.json
HEADER_LIMIT = 100 * 2**20  # safetensors caps its JSON header at 100 MB


@dataclass(frozen=True)
class Pretrained:
    """A pretraining run's encoder as an evaluation finds it, without its weights."""

    path: Path  # what --checkpoint named: the run directory, or the export
    config: PretrainConfig  # the pretraining run's
    step: int
    checkpoint: Path  # the checkpoint's tag directory, or the .safetensors file
    exported: bool

    @property
    def eval_dir(self) -> Path:
        """Where results and evaluation runs go: RUN_DIR/eval, or EXPORT_eval beside an export."""
        if not self.exported:
            return self.path / "eval"
        stem = self.path.name if self.path.is_dir() else self.path.stem
        return self.path.parent / f"{stem}_eval"

    def states(self) -> dict[str, Any]:
        """step and mlflow_run_id of the checkpoint, and for a run directory tracking_uri, the store its trainer
        logged to (read once per process). An export's metadata names a store too; it is never used."""
        if self.exported:
            return {"step": self.step, "mlflow_run_id": export_metadata(self.checkpoint).get("mlflow_run_id", "")}
        return checkpoint_states(self.path, self.step)

    def tracking(self, uri: str = "") -> TrackingConfig:
        """Where results about this encoder are logged: `uri` (--tracking-uri) when given; else a run directory's
        own tracking section; else, for an export, $MLFLOW_TRACKING_URI or the default store. A file someone shared
        is data: no store, server or path an export names is ever contacted or created."""
        own = self.config.tracking
        return replace(own, uri=uri) if uri or self.exported else own

    def recorded(self, uri: str = "") -> tuple[str, str]:
        """(the pretraining run's MLflow run id, the store to find it in) for `tracking(uri)`: a run directory's as
        its mlflow_run.json or checkpoint names it; an export's run id looked up in the store chosen here."""
        from largessl.tracking import recorded_run
        from largessl.tracking.store import resolve_uri

        states, cfg = self.states(), self.tracking(uri)
        if self.exported:
            return str(states["mlflow_run_id"]), resolve_uri(cfg)
        return recorded_run(cfg, self.path, states.get("mlflow_run_id") or "", states.get("tracking_uri") or "")

    def log_to_run(self, metrics: dict[str, float], uri: str = "") -> str:
        """Log `metrics` at the checkpoint's step onto the pretraining run, when it is known and found in the store
        (`recorded`; a store that does not exist is not created). Returns the run id, '' when not logged."""
        from largessl.tracking import Tracker

        run_id, store = self.recorded(uri)
        if not (self.tracking(uri).enabled and run_id):
            return ""
        tracker = Tracker.attach(store, run_id)
        tracker.log_metrics(metrics, self.step)
        tracker.finish()
        return tracker.run_id


CLIENT_KEYS = ("step", "mlflow_run_id", "tracking_uri")


@cache
def checkpoint_states(run_dir: Path, step: int | None = None) -> dict[str, Any]:
    """The step and MLflow run of a run's newest complete checkpoint, or of the one at `step`: read once per process
    (the evaluation's run tags and its report both need them), without keeping the file's weights."""
    import torch

    from largessl.checkpoint import model_states_file, reading

    tag_dir = checkpoint_of(run_dir, step, arg="objective.checkpoint")
    with reading(tag_dir, "objective.checkpoint"):
        states = torch.load(model_states_file(tag_dir), map_location="cpu", weights_only=False)
    return {key: states[key] for key in CLIENT_KEYS if key in states}


def export_file(path: Path) -> Path | None:
    """The .safetensors file of an export at `path` (the file, or a --format timm directory); None otherwise."""
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if path.is_dir() and (path / TIMM_DIR_FILE).is_file() and not (path / "config.yaml").is_file():
        return path / TIMM_DIR_FILE
    return None


def run_config(path: Path, arg: str = "--checkpoint") -> PretrainConfig:
    """The pretraining run's resolved config: RUN_DIR/config.yaml, or the one an export carries (no checkpoint
    is looked for: building an evaluation's model needs only this)."""
    file = export_file(path)
    if file is not None:
        return exported_config(file, arg)
    if not (path / "config.yaml").is_file():
        raise UserError(f"{arg}: {path} is not a run directory (no config.yaml) nor an export")
    return directory_config(path, arg)


def directory_config(run_dir: Path, arg: str) -> PretrainConfig:
    """RUN_DIR/config.yaml, validated."""
    try:
        text = (run_dir / "config.yaml").read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{arg}: {run_dir / 'config.yaml'} cannot be read ({exc})") from None
    return config_from_yaml_text(text, f"{arg}: {run_dir / 'config.yaml'}")


def exported_config(file: Path, arg: str) -> PretrainConfig:
    """The run config an export carries in its metadata, validated as a --config file is."""
    return config_from_yaml_text(export_metadata(file, arg)[CONFIG_KEY], f"{arg}: {file}'s embedded run config")


def open_pretrained(path: Path, step: int | None = None, arg: str = "--checkpoint") -> Pretrained:
    """The run directory's newest complete checkpoint (or the one of `step`), or the export at `path`."""
    file = export_file(path)
    if file is None:
        if path.is_file():
            raise UserError(f"{arg}: {path} is a file but not an export (a run directory or a .safetensors file "
                            "that `largessl export` wrote)")
        tag_dir = checkpoint_of(path, step, arg=arg)
        return Pretrained(path, directory_config(path, arg), step_of(tag_dir.name), tag_dir, exported=False)
    exported_step = export_step(file, arg)
    if step is not None and step != exported_step:
        raise UserError(f"--step {step}: {path} is an export of step {exported_step}")
    return Pretrained(path, exported_config(file, arg), exported_step, file, exported=True)


def export_step(file: Path, arg: str) -> int:
    """The training step an export's metadata names: a whole number >= 0."""
    text = export_metadata(file, arg).get("step", "0")
    if not (isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= 18):
        raise UserError(f"{arg}: {file}'s metadata names step {str(text)[:40]!r}, not a step number")
    return int(text)


@cache
def export_metadata(file: Path, arg: str = "--checkpoint") -> dict[str, str]:
    """The string metadata of a safetensors file, from its JSON header alone (no weights are read)."""
    try:
        with open(file, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if not 0 < size <= HEADER_LIMIT:
                raise ValueError(f"header size {size}")
            header = json.loads(handle.read(size))
    except (OSError, ValueError, RecursionError, struct.error) as exc:  # ValueError: bad JSON, bad UTF-8
        raise UserError(f"{arg}: {file} is not a readable safetensors file ({str(exc)[:200]})") from None
    meta = (header.get("__metadata__") if isinstance(header, dict) else None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UserError(f"{arg}: {file} is not a readable safetensors file (its metadata is not a map of strings)")
    if CONFIG_KEY not in meta:
        raise UserError(f"{arg}: {file} has no largessl run config in its metadata (exports written before this "
                        "version lack it; export the run again with `largessl export RUN_DIR`)")
    return meta


def load_encoder(pretrained: Pretrained) -> nn.Module:
    """An export's encoder: built with its method's layout from the run's config, its weights mapped back from
    timm's names and loaded strictly (a mismatch is a UserError naming the file)."""
    from safetensors.torch import load_file

    from largessl.models.timm_format import from_timm_state_dict
    from largessl.models.vit import ViTEncoder
    from largessl.objectives import objective_class

    cfg = pretrained.config
    encoder = ViTEncoder.from_config(cfg.model, **objective_class(cfg.objective.name).encoder_layout(cfg.objective))
    try:
        encoder.load_state_dict(from_timm_state_dict(load_file(pretrained.checkpoint), encoder), strict=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"--checkpoint: {pretrained.checkpoint} does not match its own run config ({first})") from None
    return encoder
