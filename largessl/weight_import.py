"""Starting from public weights (`model.init_from`): a released ViT, in the form it was saved, becomes the first
weights of a pretraining run, with every tensor of the file and of the objective accounted for.

What a file holds, and in which roles, is read by weight_formats.py.

The encoder is mapped onto the objective's (`map_encoder`): the patch size and width must match model.name (one
line names the key and what the file holds); learned positions are resampled to this grid (bicubic) when the
grid differs; a fixed sin-cos table is rebuilt for this grid when the file's is the same kind of table, and a file
whose learned positions would be dropped is refused; k biases are dropped for BEiT-style blocks (CAE): the k bias
adds the same amount to every key's logit of a query, so attention is unchanged. Parts the file holds for the
objective (MAE's decoder, DINO's head) are loaded; what the objective has and the file lacks starts fresh; what the
file has and the objective cannot use is ignored. Each of the three is said.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from largessl.errors import ConfigError
from largessl.weight_formats import KEY, Roles, cae_part_name, read, split_roles

UNSUPPORTED = {"reg_token": "register tokens", "dist_token": "a distillation token",
               "blocks.0.ls1.gamma": "layer scale"}


@dataclass
class Imported:
    """A file's tensors for an objective: `weights` (the objective's parameter names), and what was done."""

    form: str
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # resampled, rebuilt, dropped: one phrase each
    ignored: list[str] = field(default_factory=list)  # the file's names the objective cannot use
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)  # the file's teacher, as the objective's

    def report(self, path: str, fresh: list[str]) -> list[str]:
        """The lines start-up prints: what was loaded, what starts fresh, what was ignored."""
        lines = [f"{KEY}: {path} ({self.form}): {len(self.weights)} tensors loaded"
                 + (f"; {'; '.join(self.notes)}" if self.notes else "")]
        if fresh:
            lines.append(f"{KEY}: starts fresh (the file has none): {summarize(fresh)}")
        if self.ignored:
            lines.append(f"{KEY}: ignored (nothing here uses them): {summarize(self.ignored)}")
        return lines


def summarize(names: list[str], shown: int = 6) -> str:
    """Names grouped by their first two parts ('decoder.blocks' x 96), at most `shown` groups."""
    groups: dict[str, int] = {}
    for name in names:
        stem = ".".join(part for part in name.split(".")[:2] if not part.isdigit())
        groups[stem] = groups.get(stem, 0) + 1
    parts = [stem if count == 1 else f"{stem} ({count} tensors)" for stem, count in groups.items()]
    return ", ".join(parts[:shown]) + (f" and {len(parts) - shown} more" if len(parts) > shown else "")


# ----------------------------------------------------------------------------- the encoder


def describe(tensors: dict[str, torch.Tensor]) -> str:
    """The ViT a timm-named state dict holds, in words ('width 768, depth 12, patch 16: model.name
    vit_base_patch16')."""
    from largessl.models.config import VIT_SIZES

    proj = tensors.get("patch_embed.proj.weight")
    if proj is None:
        return "no patch_embed"
    depth = len({key.split(".")[1] for key in tensors if key.startswith("blocks.")})
    width, patch = proj.shape[0], proj.shape[-1]
    sizes = [size for size, (dim, layers, _) in VIT_SIZES.items() if (dim, layers) == (width, depth)]
    named = f": model.name vit_{sizes[0]}_patch{patch}" if sizes else ""
    return f"width {width}, depth {depth}, patch {patch}{named}"


def check_architecture(tensors: dict[str, torch.Tensor], encoder: nn.Module, model_name: str) -> None:
    """The file's ViT must be model.name's: one line naming the key that differs and what the file holds."""
    for feature, why in UNSUPPORTED.items():
        if feature in tensors and (feature != "blocks.0.ls1.gamma" or not has_layer_scale(encoder)):
            raise ConfigError(f"{KEY}: the file's encoder has {why} ({feature}), which this objective's has not")
    ours = dict(encoder.named_parameters())
    for key in ("patch_embed.proj.weight", "cls_token", "blocks.0.mlp.fc1.weight"):
        if key not in tensors:
            raise ConfigError(f"{KEY}: the file has no {key}: not a ViT under timm's names ({describe(tensors)})")
        if tuple(tensors[key].shape) != shape_of(ours[key]):
            raise ConfigError(f"{KEY}: {key} has shape {tuple(tensors[key].shape)}, {model_name}'s is "
                              f"{shape_of(ours[key])} (the file holds a ViT of {describe(tensors)})")
    depth = len(encoder.blocks)
    if f"blocks.{depth - 1}.norm1.weight" not in tensors or f"blocks.{depth}.norm1.weight" in tensors:
        raise ConfigError(f"{KEY}: the file's encoder is not {depth} blocks deep like {model_name}'s "
                          f"({describe(tensors)})")


def shape_of(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's whole shape (under ZeRO-3 the tensor is this rank's flat partition; ds_shape is the whole)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def has_layer_scale(encoder: nn.Module) -> bool:
    return hasattr(encoder.blocks[0], "gamma_1")


def map_encoder(tensors: dict[str, torch.Tensor], encoder: nn.Module, layout: dict[str, Any],
                model_name: str) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """The file's encoder (timm's names) as `encoder`'s parameters: (weights, notes, ignored names)."""
    check_architecture(tensors, encoder, model_name)
    tensors = dict(tensors)
    notes = positions(tensors, encoder, layout) + zero_qkv_biases(tensors, encoder)
    if has_layer_scale(encoder):
        notes += beit_blocks(tensors, encoder)
    if "norm.weight" in tensors and isinstance(encoder.norm, nn.Identity):
        notes.append("the file's final norm is not used (this objective's encoder has none)")
    params = dict(encoder.named_parameters())
    missing = [key for key in params if key not in tensors]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConfigError(f"{KEY}: the file's encoder lacks {missing[0]}{more} (a damaged or partial file)")
    ignored = sorted(set(tensors) - set(params))  # a classifier, or the final norm above
    return {key: value for key, value in tensors.items() if key in params}, notes, ignored


def zero_qkv_biases(tensors: dict[str, torch.Tensor], encoder: nn.Module) -> list[str]:
    """A file whose attention has no q, k, v biases (timm's qkv_bias=False) gets zero ones: the same function."""
    absent = [f"blocks.{i}.attn.qkv.bias" for i in range(len(encoder.blocks))
              if f"blocks.{i}.attn.qkv.bias" not in tensors]
    if len(absent) != len(encoder.blocks):
        return []  # some blocks have one: a partial file, said by the check for missing tensors
    for key in absent:
        tensors[key] = torch.zeros(3 * encoder.dim)
    return ["q, k and v biases set to 0 (the file's attention has none: the same function)"]


def positions(tensors: dict[str, torch.Tensor], encoder: nn.Module, layout: dict[str, Any]) -> list[str]:
    """The file's position table for this encoder: learned ones resampled to this grid; a fixed sin-cos table,
    rebuilt by the encoder itself, must be of the encoder's kind. Notes what was done."""
    from largessl.models.pos_embed import sincos_2d

    table = tensors.pop("pos_embed", None)
    if table is None:
        raise ConfigError(f"{KEY}: the file has no pos_embed")
    grid = round((table.shape[1] - 1) ** 0.5)
    if (grid * grid + 1) != table.shape[1]:
        raise ConfigError(f"{KEY}: pos_embed has {table.shape[1]} rows, not [cls] and a square grid")
    if not isinstance(encoder.pos_embed, nn.Parameter):
        fixed = sincos_2d(table.shape[-1], grid, rows_first=layout.get("pos_embed") == "sincos_rows_first")[None]
        if not torch.allclose(table.float(), fixed, atol=1e-4):
            raise ConfigError(f"{KEY}: the file's pos_embed is not this objective's fixed sin-cos table (learned, or "
                              "another layout): its encoder would lose the file's positions")
        return [] if grid == encoder.grid_size else [f"sin-cos positions rebuilt for {encoder.grid_size}x"
                                                     f"{encoder.grid_size} patches (the file's: {grid}x{grid})"]
    if grid == encoder.grid_size:
        tensors["pos_embed"] = table
        return []
    from timm.layers import resample_abs_pos_embed

    tensors["pos_embed"] = resample_abs_pos_embed(table.float(), new_size=[encoder.grid_size] * 2,
                                                  old_size=[grid, grid], num_prefix_tokens=1,
                                                  interpolation="bicubic", antialias=False)
    return [f"positions resampled from {grid}x{grid} to {encoder.grid_size}x{encoder.grid_size} patches (bicubic)"]


def beit_blocks(tensors: dict[str, torch.Tensor], encoder: nn.Module) -> list[str]:
    """timm's blocks as BEiT's (CAE), through timm_format.unfold_beit_block (the export's inverse), after two
    adaptations it refuses: layer scales of 1 where the file has none, and the k bias dropped (it moves every key's
    logit of a query alike)."""
    from largessl.models.timm_format import unfold_beit_block

    notes = set()
    for index in range(len(encoder.blocks)):
        prefix = f"blocks.{index}."
        for scale in ("ls1.gamma", "ls2.gamma"):
            if prefix + scale not in tensors:
                tensors[prefix + scale] = torch.ones(encoder.dim)
                notes.add("layer scales set to 1 (the file's blocks have none: the same function)")
        q_bias, k_bias, v_bias = tensors.get(prefix + "attn.qkv.bias", torch.zeros(3 * encoder.dim)).chunk(3)
        if k_bias.any():
            notes.add("k biases dropped (BEiT-style blocks have none; attention does not change)")
        tensors[prefix + "attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(k_bias), v_bias])
        unfold_beit_block(tensors, prefix)
    return sorted(notes)


# ----------------------------------------------------------------------------- the objective


def mae_decoder_name(key: str) -> str:
    """MAE's decoder names as ours: decoder_embed -> decoder.embed, decoder_blocks -> decoder.blocks, ..."""
    return "decoder." + (key if key == "mask_token" else key.removeprefix("decoder_"))


PARTS = {  # role -> (objective, how the file's names become the objective's, what they are)
    "mae_decoder": ("mae", mae_decoder_name, "MAE's decoder"),
    "dino_head": ("dino", lambda key: f"student.head.{key}", "DINO's head"),
    "cae_parts": ("cae", lambda key: cae_part_name(key) or key, "CAE's regressor and decoder"),
}


def map_parts(roles: dict[str, dict[str, torch.Tensor]], objective: nn.Module, name: str,
              imported: Imported) -> None:
    """The file's heads and decoders that fit the objective, into `imported` (a shape that differs is one line);
    those of another method, and anything else, are ignored."""
    params = dict(objective.named_parameters())
    for role, (method, rename, what) in PARTS.items():
        for key, value in roles.get(role, {}).items():
            ours = rename(key)
            if method != name or ours not in params:
                imported.ignored.append(key)
                continue
            if tuple(value.shape) != shape_of(params[ours]):
                raise ConfigError(f"{KEY}: {what}'s {key} has shape {tuple(value.shape)}, this run's is "
                                  f"{shape_of(params[ours])} (set the objective's sizes to the file's)")
            imported.weights[ours] = value
    imported.ignored += list(roles["other"])
    fixed_head_norm(roles.get("dino_head", {}), params, imported)


def fixed_head_norm(head: dict[str, torch.Tensor], params: dict[str, nn.Parameter], imported: Imported) -> None:
    """DINO's last layer: a file's weight_g, learned, has no place in a head with a fixed norm (norm_last_layer)
    unless it is 1 everywhere, the value the fixed norm stands for."""
    norm = head.get("last_layer.weight_g")
    if norm is None or "student.head.last_layer.weight_g" in params:
        return
    if not torch.allclose(norm.float(), torch.ones_like(norm, dtype=torch.float32)):
        raise ConfigError(f"{KEY}: DINO's head in the file learned its last layer's norm (last_layer.weight_g); "
                          "set objective.norm_last_layer=false to load it")
    imported.ignored.remove("last_layer.weight_g")
    imported.notes.append("the head's last-layer norm is 1, as this run's fixed norm")


def prefix_of(objective: nn.Module) -> str:
    """The objective's name for its encoder's parameters ('encoder.', DINO's 'student.backbone.')."""
    names = {id(param): name for name, param in objective.named_parameters()}
    return names[id(objective.trained_encoder().cls_token)].removesuffix("cls_token")


def import_file(path: Path, objective: nn.Module, cfg: Any) -> Imported:
    """`path`'s tensors as `objective`'s parameters (see the module docstring), and the file's teacher, where it
    has one and the objective too, as the objective's teacher (`Imported.teacher`)."""
    form, roles, teacher_roles = split_roles(*read(path))
    imported = trained_side(form, roles, objective, cfg)
    if teacher_roles is None:
        return imported
    to_teacher = {student: teacher for teacher, student in objective.teacher_pairs()}
    if not to_teacher:
        imported.ignored += [f"teacher.{key}" for role in teacher_roles.values() for key in role]
        return imported
    teacher = trained_side(form, teacher_roles, objective, cfg)
    imported.teacher = {to_teacher[key]: value for key, value in teacher.weights.items()}
    return imported


def trained_side(form: str, roles: Roles, objective: nn.Module, cfg: Any) -> Imported:
    """One side of the file (its model, or its student, or its teacher) as the objective's trained parameters."""
    layout = type(objective).encoder_layout(cfg.objective)
    encoder, notes, ignored = map_encoder(roles["encoder"], objective.trained_encoder(), layout, cfg.model.name)
    prefix = prefix_of(objective)
    imported = Imported(form, {prefix + key: value for key, value in encoder.items()}, notes, ignored)
    map_parts(roles, objective, cfg.objective.name, imported)
    return imported


def fresh(objective: nn.Module, imported: Imported) -> list[str]:
    """The objective's parameters the file did not give, less those an EMA teacher copies from the student."""
    followers = {teacher for teacher, _ in objective.teacher_pairs()}
    return [name for name, _ in objective.named_parameters() if name not in imported.weights and name not in followers]


def load_initial(objective: nn.Module, cfg: Any, resuming: bool) -> list[str]:
    """Load what a new run starts from into `objective`, before DeepSpeed takes it: an evaluation's pretrained
    encoder, or model.init_from's file (not read when the run resumes: its checkpoint has the weights, and a
    requeued job must not need the file). Returns the lines to say."""
    from largessl.distributed.engine import load_weights

    weights = objective.initial_weights()
    if weights:
        return [f"initial weights: {load_weights(objective, weights)} tensors from {cfg.objective.checkpoint}"]
    if not cfg.model.init_from:
        return []
    if resuming:
        return [f"{KEY}: not read (the run resumes from its checkpoint)"]
    imported = import_file(Path(cfg.model.init_from), objective, cfg)
    load_weights(objective, imported.weights)
    lines = imported.report(cfg.model.init_from, fresh(objective, imported))
    if imported.teacher:
        objective.initial_teacher = imported.teacher  # fp32; EMATeacher.initialize starts from it
        lines.append(f"{KEY}: the teacher starts from the file's teacher ({len(imported.teacher)} tensors)")
    elif objective.teacher_pairs():
        lines.append(f"{KEY}: the teacher starts as the student's copy, as in every new run")
    return lines


def encoder_freeze(objective: nn.Module, model_cfg: Any) -> dict[str, int]:
    """model.freeze_encoder_steps as a frozen-at-start prefix: the objective's name for its trained encoder."""
    steps = model_cfg.freeze_encoder_steps or 0
    return {prefix_of(objective): steps} if steps > 0 else {}
