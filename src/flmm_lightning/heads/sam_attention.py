"""SAM's image-encoder attention through one fused SDPA call, for the fast path.

segment-anything computes ``softmax(q k^T * scale + rel_pos) v`` step by step: the ``[B*heads, N, N]`` logits
are written, the decomposed relative-position terms added, the softmax taken (in fp32 under autocast) and the
result multiplied by ``v``; at 1024 px a global block holds ``N = 4096`` tokens, so each of those steps moves
gigabytes per image. Here the relative-position terms become SDPA's additive mask and the rest happens inside
the fused kernel: the same function, one ``N x N`` tensor (the bias) instead of five passes over them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn

ENCODER_ATTENTIONS = ("sdpa", "reference")


class SdpaRelPosAttention(Attention):
    """segment-anything's ``Attention`` (same weights) with the product, bias and softmax in one SDPA call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # each [B, nH, N, d]
        bias = None
        if self.use_rel_pos:
            bias = relative_position_bias(query, self.rel_pos_h, self.rel_pos_w, (height, width))
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=self.scale)
        attended = attended.permute(0, 2, 1, 3).reshape(batch, height, width, -1)  # [B, H, W, nH*d]
        return self.proj(attended)


def relative_position_bias(
    query: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """The decomposed relative-position logits (MViTv2) of queries ``[B, nH, H*W, d]`` over keys on the same
    ``H x W`` grid, as an additive mask ``[B, nH, H*W, H*W]`` in the query's dtype."""
    height, width = size
    batch, heads, tokens, dim = query.shape
    r_h = get_rel_pos(height, height, rel_pos_h)  # [H (query row), H (key row), d]
    r_w = get_rel_pos(width, width, rel_pos_w)  # [W, W, d]
    grid_query = query.reshape(batch, heads, height, width, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_query, r_h.to(query.dtype))  # [B, nH, H, W, H]
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_query, r_w.to(query.dtype))  # [B, nH, H, W, W]
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # [B, nH, H, W, H, W]
    return bias.reshape(batch, heads, tokens, tokens)


def set_encoder_attention(encoder: nn.Module, name: str) -> None:
    """``"sdpa"``: every attention block of a SAM image encoder runs ``SdpaRelPosAttention``;
    ``"reference"``: segment-anything's own. Weights are untouched."""
    if name not in ENCODER_ATTENTIONS:
        raise ValueError(f"SAM encoder attention must be one of {ENCODER_ATTENTIONS}, got {name!r}")
    target = SdpaRelPosAttention if name == "sdpa" else Attention
    for module in encoder.modules():
        if isinstance(module, Attention):
            module.__class__ = target
