"""Our ViTEncoder as timm's `vision_transformer.VisionTransformer`: its name, create_model arguments and weights.

The parameter names are timm's already (patch_embed.proj, cls_token, blocks.i.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}, norm); what differs: a fixed sin-cos table is a buffer we do not save, written as timm's learned
`pos_embed` [1, 1 + N, D] ([cls] position first: timm adds it after prepending [cls], we add it to cls_token, the
same sums); CAE's blocks are timm's beit.Block, whose gamma_1/gamma_2 are timm's ls1/ls2.gamma and whose q and v
biases, with the fixed zero k bias, are timm's fused attn.qkv.bias. Our forward norms every token, if the encoder
has a final norm (SIM's has none: its `norm` is nn.Identity, so there is no norm.weight/bias and timm is built with
final_norm=False, which leaves out both its norm and its fc_norm). timm's pooled feature is then the [cls] token
("token"), or for CAE and SIM the mean of the patch tokens ("avg" with fc_norm=False, which keeps timm's norm,
where there is one, before the pooling).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

POOL = {"cae": "mean", "sim": "mean"}  # the feature exported (ViTEncoder.forward_pooled); "cls" otherwise
FEATURE_ATOL = 1e-4  # export-time check, fp32; the tests hold the two models to 1e-5


def timm_name(cfg: Any) -> str:
    """timm's registered ViT of our size and patch (the full architecture is passed anyway, see timm_kwargs)."""
    size = cfg.model.name.split("_")[1]
    names = [f"vit_{size}_patch{p}_224" for p in (cfg.model.patch_size, 16, 14)]
    return next(name for name in names if timm.is_model(name))


def timm_kwargs(cfg: Any, encoder: nn.Module) -> dict[str, Any]:
    """create_model arguments that make timm's VisionTransformer `encoder`: no head, our size and image size, layer
    scale for CAE, no final norm where the encoder has none (SIM), and the pooled feature the export gives ([cls];
    CAE, SIM: the mean of the patch tokens, after the final norm if there is one)."""
    dim, depth, heads = cfg.model.dims
    cae = cfg.objective.name == "cae"
    kwargs = dict(num_classes=0, img_size=cfg.model.image_size, patch_size=cfg.model.patch_size, embed_dim=dim,
                  depth=depth, num_heads=heads, mlp_ratio=4.0, qkv_bias=True, class_token=True,
                  init_values=float(cfg.objective.layer_scale) if cae else None,
                  global_pool="avg" if POOL.get(cfg.objective.name) == "mean" else "token")
    if kwargs["global_pool"] == "avg":
        kwargs["fc_norm"] = False  # timm would move the final norm after the pooling; ours comes before it
    if not has_final_norm(encoder):
        kwargs["final_norm"] = False  # timm then has neither norm nor fc_norm (whatever fc_norm says)
    return kwargs


def has_final_norm(encoder: nn.Module) -> bool:
    """Whether the encoder norms its output tokens (ViTEncoder(final_norm=False), SIM's, has nn.Identity there)."""
    return not isinstance(encoder.norm, nn.Identity)


def timm_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Our encoder's weights (fp32, contiguous) under timm's VisionTransformer names."""
    state = {key: value.detach().float().contiguous() for key, value in encoder.state_dict().items()}
    state["pos_embed"] = encoder.pos_embed.detach().float().clone()  # learned (DINO) or the fixed sin-cos table
    for index in range(len(encoder.blocks)):
        if f"blocks.{index}.gamma_1" in state:
            fold_beit_block(state, f"blocks.{index}.")
    return state


def fold_beit_block(state: dict[str, torch.Tensor], prefix: str) -> None:
    """timm's beit.Block (CAE) -> vision_transformer.Block: layer scales renamed, q/0/v biases as one qkv bias
    (each where the block has it: a file written without layer scale or biases has none to rename)."""
    for theirs, ours in (("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma")):
        if prefix + theirs in state:
            state[prefix + ours] = state.pop(prefix + theirs)
    if prefix + "attn.q_bias" in state:
        q_bias, v_bias = state.pop(prefix + "attn.q_bias"), state.pop(prefix + "attn.v_bias")
        state[prefix + "attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])


def from_timm_state_dict(state: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
    """timm_state_dict undone for `encoder` (the same layout): layer scales and q/v biases unfolded where its blocks
    are BEiT's, and `pos_embed` kept only where it is learned. A fixed table that is not the encoder's own, or a
    non-zero k bias, raises ValueError: the file was not written for this layout."""
    state = dict(state)
    table = state.pop("pos_embed", None)
    if isinstance(encoder.pos_embed, nn.Parameter):
        state["pos_embed"] = table
    elif table is None or table.shape != encoder.pos_embed.shape or not torch.allclose(table, encoder.pos_embed):
        raise ValueError("its pos_embed is not the encoder's fixed sin-cos table")
    ours = encoder.state_dict()
    for index in range(len(encoder.blocks)):
        if f"blocks.{index}.gamma_1" in ours:
            unfold_beit_block(state, f"blocks.{index}.")
    return state


def unfold_beit_block(state: dict[str, torch.Tensor], prefix: str) -> None:
    """fold_beit_block undone: ls1/ls2.gamma -> gamma_1/gamma_2, the fused qkv bias -> q_bias and v_bias."""
    state[prefix + "gamma_1"] = state.pop(prefix + "ls1.gamma")
    state[prefix + "gamma_2"] = state.pop(prefix + "ls2.gamma")
    q_bias, k_bias, v_bias = state.pop(prefix + "attn.qkv.bias").chunk(3)
    if k_bias.any():
        raise ValueError(f"{prefix}attn.qkv.bias has a non-zero k part; BEiT's blocks have none")
    state[prefix + "attn.q_bias"], state[prefix + "attn.v_bias"] = q_bias, v_bias


def build_timm(name: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """The timm model holding `state`: built on the meta device (no init, no memory), then given the tensors. A key
    missing or left over, or a shape that differs, raises: it is a bug of the converter, and nothing is written."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(state, strict=True, assign=True)
    left = [key for key, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"timm's {name} has tensors the export does not fill: {left[:5]}")
    return model.eval()


def check_features(encoder: nn.Module, model: nn.Module, pool: str, image_size: int) -> float:
    """Max |ours - timm's| of the pooled features of two random images; a converter bug raises."""
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (encoder.forward_pooled(images, pool=pool) - model(images)).abs().max().item()
    if not diff <= FEATURE_ATOL:
        raise RuntimeError(f"timm's features differ from the encoder's by {diff:.3g} (a converter bug)")
    return diff
