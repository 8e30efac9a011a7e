"""Hugging Face transformers' ViT weights under timm's names (what weight_import maps onto our encoder).

transformers' ViTModel, ViTMAEModel and Dinov2Model name the same parts differently from timm, and their names
changed with transformers 5; both are read:
- embeddings.{cls_token, position_embeddings, patch_embeddings.projection} -> cls_token, pos_embed, patch_embed.proj
  (Dinov2's embeddings.mask_token, used only for masked inputs, has no counterpart);
- layer i: `encoder.layer.i.` (transformers 4, and Dinov2 in 5) or `layers.i.` (ViT and ViT-MAE in 5) -> blocks.i;
  the separate query/key/value (4: attention.attention.{query,key,value}; 5: attention.{q,k,v}_proj) -> one fused
  attn.qkv, rows q then k then v, as timm's; attention.output.dense / attention.o_proj -> attn.proj;
  layernorm_before/after or norm1/norm2 -> norm1/norm2; intermediate.dense + output.dense or mlp.fc1/fc2 -> mlp.fc1/fc2;
  layer_scale{1,2}.lambda1 (Dinov2) -> ls{1,2}.gamma;
- layernorm -> norm; a pooler or classifier is not the encoder's.
A task model's backbone prefix (`vit.`, `dinov2.`) is removed first.
"""

from __future__ import annotations

import re

import torch

MODEL_TYPES = {"vit": "ViTModel", "vit_mae": "ViTMAEModel", "dinov2": "Dinov2Model"}
PREFIXES = ("vit.", "dinov2.")
LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
IN_LAYER = {  # a layer's names (both eras) -> timm's block names; q, k, v handled apart
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "layernorm_before": "norm1", "norm1": "norm1", "layernorm_after": "norm2", "norm2": "norm2",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "layer_scale1": "ls1", "layer_scale2": "ls2",
}
QKV = {"attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
       "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}
EMBEDDINGS = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
              "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
              "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
              "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}


def to_timm(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the encoder under timm's names, the names that are not the encoder's)."""
    prefix = next((p for p in PREFIXES if any(key.startswith(p) for key in state)), "")
    timm_state: dict[str, torch.Tensor] = {}
    parts: dict[str, list[torch.Tensor | None]] = {}  # blocks.i.attn.qkv.{weight,bias} -> [q, k, v]
    others = []
    for key, value in state.items():
        name = key.removeprefix(prefix) if key.startswith(prefix) else None
        if name in EMBEDDINGS:
            timm_state[EMBEDDINGS[name]] = value
        elif name is not None and (found := LAYER.match(name)) and in_layer(found[2]) is not None:
            index, rest = found[1], found[2]
            target, slot = in_layer(rest)
            if slot is None:
                timm_state[f"blocks.{index}.{target}"] = value
            else:
                parts.setdefault(f"blocks.{index}.{target}", [None, None, None])[slot] = value
        else:
            others.append(key)
    for key, (q, k, v) in parts.items():
        if q is None or k is None or v is None:
            raise ValueError(f"{key}: the file lacks one of its query, key and value")
        timm_state[key] = torch.cat([q, k, v])
    return timm_state, others


def in_layer(rest: str) -> tuple[str, int | None] | None:
    """timm's name within a block for a layer's `rest` ('attention.q_proj.weight' -> ('attn.qkv.weight', 0): the
    slot of q, k or v in the fused tensor; None for the others); None when it is not the encoder's."""
    module, _, leaf = rest.rpartition(".")
    if module in QKV:
        return f"attn.qkv.{leaf}", QKV[module]
    if module in IN_LAYER:
        return f"{IN_LAYER[module]}.{'gamma' if leaf == 'lambda1' else leaf}", None
    return None
