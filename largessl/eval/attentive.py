"""CAE's attentive probe on frozen tokens (methods.md 4.5).

The frozen encoder's output tokens X ([cls] included, after the final norm) are read by one learned query token
through one cross-attention block with no residual and no MLP:

    out = CrossAttn(LN_q(query), keys = LN_k(X), values = LN_v(X))      # the encoder's number of heads
    logits = Linear(BatchNorm_without_affine(out))                     # N(0, 0.01) weights, bias 0

Trained: the query token (zeros at the start), the block (Linear weights N(0, 0.02), biases 0) and the head (SGD
nesterov, lr 0.4 absolute in the reference). The cross attention is CAE's (models/cross_attention.py: q and v
biases, a fixed zero k bias; qkv_bias=True in every CAE model).

Deviations: the BatchNorm is synchronised over ranks, as in the linear probe (linear.py says why); and at
evaluation it reads its running statistics, where CAE's LP_BatchNorm normalises every evaluation batch by its own
statistics (its `is_train` defaults to True and evaluate() does not change it), which makes a prediction depend on
the other images of its batch. CAE's script calls the block with two arguments its forward does not take
(bool_masked_pos, rel_pos_bias; modeling_finetune.py), so we follow the block's forward as defined.

Reference: https://github.com/Atten4Vis/CAE/blob/master/tools/run_attentive.py, models/modeling_finetune.py
(AttentiveBlock, VisionTransformerForAttentiveProbe)
"""

from __future__ import annotations

import torch
from torch import nn

from largessl.eval.protocol import Protocol, normal_linear
from largessl.eval.protocol_config import AttentiveConfig
from largessl.models import flops
from largessl.models.batchnorm import TokenSyncBatchNorm, load_norm_state, norm_state
from largessl.models.config import ModelConfig
from largessl.models.cross_attention import CrossAttention
from largessl.models.vit import LayerNorm


class AttentiveBlock(nn.Module):
    """A learned query token attends to tokens: CrossAttn(LN_q(query), LN_k(x), LN_v(x)) -> [B, 1, D], nothing
    added back. The query lives here so that ZeRO-3 gathers it with the block."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.query_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_q, self.norm_k, self.norm_v = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, heads)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        query = self.query_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        return self.cross_attn(self.norm_q(query), self.norm_k(tokens), self.norm_v(tokens))


class AttentiveProbe(Protocol):
    name = "attentive"
    Config = AttentiveConfig

    def __init__(self, cfg: AttentiveConfig, model_cfg: ModelConfig) -> None:
        super().__init__(cfg, model_cfg)
        dim, _, heads = model_cfg.dims
        self.attentive = AttentiveBlock(dim, heads)  # the query token starts at zero, as CAE's (never re-drawn)
        for linear in (self.attentive.cross_attn.q, self.attentive.cross_attn.k, self.attentive.cross_attn.v,
                       self.attentive.cross_attn.proj):
            nn.init.normal_(linear.weight, std=0.02)  # CAE: timm trunc_normal_(std=.02), cut at +-2 (absolute)
        nn.init.zeros_(self.attentive.cross_attn.proj.bias)
        self.head_norm = TokenSyncBatchNorm(dim, eps=1e-5, affine=False)  # CAE's LP_BatchNorm: eps 1e-5
        self.head = normal_linear(dim, cfg.num_classes, cfg.head_init_std)

    def no_weight_decay(self) -> set[str]:
        return {"attentive.query_token"}

    def head_flops(self) -> float:
        """One query attending to every output token (no MLP), then the linear head."""
        tokens = self.encoder.num_patches + 1
        return flops.cross_block(1, tokens, self.encoder.dim, mlp=False) + flops.per_token(self.head)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(self.attentive(self.encoder_tokens(images)))[:, 0])

    def extra_state(self) -> dict[str, torch.Tensor]:
        return norm_state(self)

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        load_norm_state(self, state)
