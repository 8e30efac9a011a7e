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
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from largessl.checkpoint import checkpoint_of, step_of
from largessl.config.load import config_from_yaml_text
from largessl.config.schema import PretrainConfig
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

    @property
    def tracking_dir(self) -> Path:
        """The directory whose mlflow_run.json names the pretraining run (an export's: none; its metadata does)."""
        return self.checkpoint.parent if self.exported else self.path

    def states(self) -> dict[str, Any]:
        """step, mlflow_run_id and tracking_uri of the checkpoint (read once per process)."""
        if self.exported:
            meta = export_metadata(self.checkpoint)
            return {"step": self.step, "mlflow_run_id": meta.get("mlflow_run_id", ""),
                    "tracking_uri": meta.get("tracking_uri", "")}
        from largessl.eval.standalone import load_encoder_states

        return load_encoder_states(self.path, self.step)


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
        return config_from_yaml_text(export_metadata(file, arg)[CONFIG_KEY])
    if not (path / "config.yaml").is_file():
        raise UserError(f"{arg}: {path} is not a run directory (no config.yaml) nor an export")
    return config_from_yaml_text((path / "config.yaml").read_text())


def open_pretrained(path: Path, step: int | None = None, arg: str = "--checkpoint") -> Pretrained:
    """The run directory's newest complete checkpoint (or the one of `step`), or the export at `path`."""
    file = export_file(path)
    if file is None:
        if path.is_file():
            raise UserError(f"{arg}: {path} is a file but not an export (a run directory or a .safetensors file "
                            "that `largessl export` wrote)")
        tag_dir = checkpoint_of(path, step, arg=arg)
        config = config_from_yaml_text((path / "config.yaml").read_text())
        return Pretrained(path, config, step_of(tag_dir.name), tag_dir, exported=False)
    meta = export_metadata(file, arg)
    exported_step = int(meta.get("step", 0))
    if step is not None and step != exported_step:
        raise UserError(f"--step {step}: {path} is an export of step {exported_step}")
    return Pretrained(path, config_from_yaml_text(meta[CONFIG_KEY]), exported_step, file, exported=True)


@cache
def export_metadata(file: Path, arg: str = "--checkpoint") -> dict[str, str]:
    """The string metadata of a safetensors file, from its JSON header alone (no weights are read)."""
    try:
        with open(file, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if not 0 < size <= HEADER_LIMIT:
                raise ValueError(f"header size {size}")
            header = json.loads(handle.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise UserError(f"{arg}: {file} is not a readable safetensors file ({exc})") from None
    meta = header.get("__metadata__") or {}
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
