"""What a file given to `model.init_from` holds, sorted into roles (the encoder under timm's names, a decoder, a
head, a teacher, the rest) for weight_import.py to map onto an objective.

What a file is comes from its contents, never from its name:
- a safetensors file or a torch pickle holding a flat state dict under timm's VisionTransformer names (timm's own
  files, the DINO release `dino_vitbase16_pretrain.pth`, `largessl export --format safetensors`);
- a directory holding `model.safetensors` (or `pytorch_model.bin`) beside timm's `config.json`
  (`largessl export --format timm`, `save_pretrained` of timm);
- MAE's checkpoints, `{"model": ...}`: the encoder alone (`mae_pretrain_vit_base.pth`) or with its decoder (the
  `_full` files: mask_token, decoder_embed, decoder_pos_embed, decoder_blocks, decoder_norm, decoder_pred);
- DINO's full checkpoints, `{"student": ..., "teacher": ...}`: the student's backbone and head (DDP's `module.`
  prefix removed), and the teacher's as the run's teacher (EMATeacher.initialize starts its fp32 state from them);
  elsewhere the teacher is the student's copy at the start, as in every new run;
- CAE's checkpoints, `{"model": ...}` with `encoder.` (BEiT-style blocks: q_bias, v_bias, gamma_1/2), the
  regressor (`regresser.regressor_blocks`) and decoder (`decoder.decoder_blocks`, `decoder.head`), all loaded;
- SIM's checkpoints, `{"model": ...}` with the online encoder at the top (timm's names, no final norm): the encoder
  (its projector and predictor use batch norms where ours use layer norms: they start fresh; its momentum branch
  `mm_*` too: the teacher is the student's copy).
Pickles are read with torch's weights-only loader (argparse's Namespace, which MAE and DINO store as `args`, is the
one class it admits): a file cannot run code here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from largessl.errors import ConfigError

KEY = "model.init_from"


def read(path: Path) -> tuple[str, dict[str, Any]]:
    """(what `path` holds, in words; its contents: tensors, or the dicts of a checkpoint)."""
    if path.is_dir():
        return read_directory(path)
    if not path.is_file():
        raise ConfigError(f"{KEY}: {path} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if is_safetensors(head):
        return "safetensors", load_safetensors(path)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch file", load_pickle(path)
    raise ConfigError(f"{KEY}: {path} is neither a safetensors file nor a torch checkpoint")


def is_safetensors(head: bytes) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian) and then '{'."""
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100 * 2**20


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{KEY}: {path} cannot be read as safetensors ({exc})") from None


def load_pickle(path: Path) -> dict[str, Any]:
    """A torch checkpoint through the weights-only loader (no code runs); Namespace (MAE's, DINO's `args`) admitted."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the loader's refusals and a damaged file alike: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{KEY}: {path} cannot be read as a weights-only torch checkpoint ({first[:200]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{KEY}: {path} holds a {type(loaded).__name__}, not a state dict")
    return loaded


def read_directory(path: Path) -> tuple[str, dict[str, Any]]:
    """A saved model's directory: timm's (config.json with `architecture`) or transformers' (`model_type`: ViT,
    ViT-MAE, DINOv2; its names turned into timm's, models/hf_format.py), with its weights file."""
    config = read_config(path / "config.json")
    weights = next((path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()),
                   None)
    if weights is None:
        raise ConfigError(f"{KEY}: {path} holds no model.safetensors or pytorch_model.bin")
    _, tensors = read(weights)
    if "model_type" not in config:
        return f"timm directory ({config.get('architecture', 'no architecture named')})", tensors
    from largessl.models import hf_format

    if config["model_type"] not in hf_format.MODEL_TYPES:
        raise ConfigError(f"{KEY}: {path} is a transformers {config['model_type']} model; readable are "
                          f"{', '.join(hf_format.MODEL_TYPES.values())}")
    try:
        encoder, others = hf_format.to_timm(tensors_of(tensors))
    except ValueError as exc:
        raise ConfigError(f"{KEY}: {path}: {exc}") from None
    eps = config.get("layer_norm_eps", 1e-6)
    form = (f"transformers {hf_format.MODEL_TYPES[config['model_type']]} directory"
            + (f"; its layer norms' eps {eps:g}, this encoder's 1e-06" if eps != 1e-6 else ""))
    return form, {**encoder, **{key: tensors[key] for key in others}}


def read_config(path: Path) -> dict[str, Any]:
    """A directory's config.json ({} when there is none); one line when it is not JSON."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{KEY}: {path} is not readable JSON ({exc})") from None
    return config if isinstance(config, dict) else {}


# ----------------------------------------------------------------------------- what the file holds


def split_roles(form: str, contents: dict[str, Any]) -> tuple[str, Roles, Roles | None]:
    """(the form in words, the roles of the trained side, those of a teacher the file holds, or None); see
    `roles_of`. A checkpoint's state dict is found under `model` (MAE, CAE, SIM), `module` or `state_dict`."""
    if isinstance(contents.get("student"), dict) and isinstance(contents.get("teacher"), dict):
        teacher = roles_of(tensors_of(contents["teacher"]), dino=True)
        return "DINO full checkpoint", roles_of(tensors_of(contents["student"]), dino=True), teacher
    wrapper = next((key for key in ("model", "module", "state_dict") if isinstance(contents.get(key), dict)), "")
    flat = tensors_of(contents[wrapper] if wrapper else contents)
    if "encoder.cls_token" in flat:
        return "CAE checkpoint", cae_roles(flat), None
    if any(key.startswith(SIM_ONLY) for key in flat):
        roles = roles_of(flat, dino=False)
        roles["other"].update(roles.pop("mae_decoder"))  # SIM's decoder_* are its projector's and predictor's
        roles["mae_decoder"] = {}
        return "SIM checkpoint", roles, None
    if any(key.startswith("decoder_") for key in flat):
        form = "MAE checkpoint with its decoder"
    elif wrapper:
        form = f"checkpoint, its '{wrapper}' under timm's names"
    elif "directory" not in form:
        form = f"{form} under timm's names"
    return form, roles_of(flat, dino=False), None


SIM_ONLY = ("mm_", "projector_decoder_blocks.", "predictor_decoder_blocks.")  # SIM's target branch and heads


Roles = dict[str, dict[str, torch.Tensor]]


def roles_of(flat: dict[str, torch.Tensor], dino: bool) -> Roles:
    """{role: tensors}: `encoder` (timm's names), `mae_decoder` (MAE's names), `dino_head` (DINO's; `dino`: the
    file is DINO's, whose `head.` is its projection head, not a classifier), and `other` for what none of them is.
    DDP's `module.` prefix is removed first."""
    roles: Roles = {"encoder": {}, "mae_decoder": {}, "dino_head": {}, "other": {}}
    for key, value in flat.items():
        key = key.removeprefix("module.")
        if key.startswith("backbone."):
            roles["encoder"][key.removeprefix("backbone.")] = value
        elif key.startswith("head.") and dino:
            roles["dino_head"][key.removeprefix("head.")] = value
        elif key.startswith(("decoder_", "mask_token")):
            roles["mae_decoder"][key] = value
        elif key.startswith(("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "reg_token", "dist_token")):
            roles["encoder"][key] = value
        else:
            roles["other"][key] = value
    return roles


def cae_roles(flat: dict[str, torch.Tensor]) -> Roles:
    """CAE's pretraining model (its repository's names): `encoder.` (BEiT-style blocks: q_bias, v_bias, gamma_1/2,
    turned into timm's names), the regressor and decoder (`cae_parts`); its alignment encoder (a copy of the
    encoder), the regressor's fixed position table and the rest are `other`."""
    roles: Roles = {"encoder": {}, "mae_decoder": {}, "dino_head": {}, "cae_parts": {}, "other": {}}
    for key, value in flat.items():
        if key.startswith("encoder."):
            roles["encoder"][key.removeprefix("encoder.")] = value
        elif cae_part_name(key) is not None:
            roles["cae_parts"][key] = value
        else:
            roles["other"][key] = value
    roles["encoder"] = beit_to_timm(roles["encoder"])
    return roles


CAE_PARTS = (("regresser.regressor_blocks.", "regressor.blocks."), ("regresser.norm.", "regressor.norm."),
             ("decoder.decoder_blocks.", "decoder.blocks."), ("decoder.norm.", "decoder.norm."),
             ("decoder.head.", "decoder.head."))
CAE_IN_BLOCK = {"norm2_cross": "norm2", "mlp_cross": "mlp", "gamma_1_cross": "gamma_1", "gamma_2_cross": "gamma_2"}


def cae_part_name(key: str) -> str | None:
    """Our name for a regressor or decoder tensor of CAE's repository (regresser.regressor_blocks.N.mlp_cross.fc1
    -> regressor.blocks.N.mlp.fc1), None for anything else."""
    if key == "mask_token":
        return "regressor.mask_token"
    for theirs, ours in CAE_PARTS:
        if key.startswith(theirs):
            return ours + ".".join(CAE_IN_BLOCK.get(part, part) for part in key.removeprefix(theirs).split("."))
    return None


def beit_to_timm(encoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BEiT-style block names (CAE's) as timm's, block by block (timm_format.fold_beit_block, as the export)."""
    from largessl.models.timm_format import fold_beit_block

    out = dict(encoder)
    for index in {key.split(".")[1] for key in encoder if key.startswith("blocks.")}:
        fold_beit_block(out, f"blocks.{index}.")
    return out


def tensors_of(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a state dict (a checkpoint's other entries, such as numbers, left out)."""
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
