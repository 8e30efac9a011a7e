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
from typing import Any

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


# ----------------------------------------------------------------------------- writing (largessl export --format hf)

# transformers' class for each method's encoder: ViT for a plain one; DINOv2's for CAE's, whose blocks have layer
# scale. SIM's encoder has no final norm, and both classes end in one: it has no counterpart.
HF_KIND = {"mae": "vit", "dino": "vit", "cae": "dinov2"}
NO_COUNTERPART = {"sim": "SIM's encoder has no final norm, and transformers' ViT and DINOv2 models always end in "
                         "one: export it with --format timm (timm builds it with final_norm=False)"}
FROM_TIMM = {"vit": {"norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense",
                     "mlp.fc2": "output.dense"},
             "dinov2": {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
                        "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}}
BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$")


def from_timm(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """timm's names -> transformers 4's (which transformers 5 reads too) for `kind` ('vit', 'dinov2'); the fused
    qkv split into query, key and value. ViTModel always has a pooler (dense + tanh on the [cls] output), which no
    method trains: identity weights, so pooler_output is tanh of the [cls] feature; DINOv2's mask token (used only
    for masked inputs) is zeros."""
    inverse = {timm: hf for hf, timm in EMBEDDINGS.items()}
    out = {inverse[key]: value for key, value in state.items() if key in inverse}
    for key, value in state.items():
        found = BLOCK.match(key)
        if not found:
            continue
        index, module, leaf = found.groups()
        prefix = f"encoder.layer.{index}."
        if module == "attn.qkv":
            for name, part in zip(("query", "key", "value"), value.chunk(3), strict=True):
                out[f"{prefix}attention.attention.{name}.{leaf}"] = part.contiguous()
        elif module == "attn.proj":
            out[f"{prefix}attention.output.dense.{leaf}"] = value
        else:
            name = FROM_TIMM[kind][f"{module}.{leaf}" if leaf == "gamma" else module]
            out[prefix + (name if leaf == "gamma" else f"{name}.{leaf}")] = value
    dim = state["cls_token"].shape[-1]
    if kind == "vit":
        out["pooler.dense.weight"], out["pooler.dense.bias"] = torch.eye(dim), torch.zeros(dim)
    else:
        out["embeddings.mask_token"] = torch.zeros(1, dim)
    return out


def hf_config(kind: str, dims: tuple[int, int, int], image_size: int, patch_size: int) -> dict[str, Any]:
    """config.json of `kind` for our encoder: timm's layer-norm eps (1e-6), exact GELU, biases on q, k, v."""
    dim, depth, heads = dims
    shared = {"hidden_size": dim, "num_hidden_layers": depth, "num_attention_heads": heads,
              "image_size": image_size, "patch_size": patch_size, "num_channels": 3, "qkv_bias": True,
              "layer_norm_eps": 1e-6, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
              "attention_probs_dropout_prob": 0.0}
    if kind == "vit":
        return {"model_type": "vit", "architectures": ["ViTModel"], **shared, "intermediate_size": 4 * dim,
                "pooler_output_size": dim, "pooler_act": "tanh"}
    return {"model_type": "dinov2", "architectures": ["Dinov2Model"], **shared, "mlp_ratio": 4,
            "layerscale_value": 1.0, "use_swiglu_ffn": False, "drop_path_rate": 0.0}


def check_directory(directory: Any, encoder: Any, image_size: int, atol: float) -> float:
    """Load `directory` with transformers' AutoModel: no key missing, left over or of another shape, and its
    last_hidden_state within `atol` of our encoder's tokens (fp32, two random images); returns the difference.
    A converter bug raises."""
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(str(directory), output_loading_info=True)
    problems = {key: sorted(value) for key, value in info.items() if value and key != "error_msgs"}
    if problems or info.get("error_msgs"):
        raise RuntimeError(f"transformers loads the export with {problems or info['error_msgs']} (a converter bug)")
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model.eval()(pixel_values=images).last_hidden_state - encoder.eval()(images)).abs().max().item()
    if not diff <= atol:
        raise RuntimeError(f"transformers' features differ from the encoder's by {diff:.3g} (a converter bug)")
    return diff
