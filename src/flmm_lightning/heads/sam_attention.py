"""SAM's image-encoder attention through one fused SDPA call, for the fast path.

segment-anything computes ``softmax(q k^T * scale + rel_pos) v`` step by step: the ``[B*heads, N, N]`` logits
are written, the decomposed relative-position terms added, the softmax taken (in fp32 under autocast) and the
result multiplied by ``v``. At 1024 px a global block holds ``N = 4096`` tokens, so each of those steps moves
gigabytes per image. The relative-position term of query ``i`` and key ``(r, c)`` on the ``H x W`` grid is
``rel_h[i, r] + rel_w[i, c]``: the dot product of the query's ``[rel_h[i], rel_w[i]]`` with the key's one-hot
row and column. Appended as extra query and key channels, it lets one fused kernel compute the same function
with no ``N x N`` tensor at all (ViT-L, global block: 64 -> 192 channels per head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn

ENCODER_ATTENTIONS = ("sdpa", "reference")
# Fused attention kernels want head sizes in multiples of 8.
HEAD_DIM_MULTIPLE = 8


class SdpaRelPosAttention(Attention):
    """segment-anything's ``Attention`` (same weights) with the product, bias and softmax in one SDPA call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # each [B, nH, N, d]
        head_dim = query.shape[-1]
        if not self.use_rel_pos:
            attended = F.scaled_dot_product_attention(query, key, value, scale=self.scale)
        else:
            query, key = relative_position_channels(
                query, key, self.scale, self.rel_pos_h, self.rel_pos_w, (height, width)
            )  # each [B, nH, N, d']
            value = F.pad(value, (0, query.shape[-1] - head_dim))  # same size for every kernel; zeros
            attended = F.scaled_dot_product_attention(query, key, value, scale=1.0)[..., :head_dim]
        attended = attended.permute(0, 2, 1, 3).reshape(batch, height, width, -1)  # [B, H, W, nH*d]
        return self.proj(attended)


def relative_position_channels(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys ``[B, nH, H*W, d]`` on an ``H x W`` grid -> ``[B, nH, H*W, d']`` whose plain dot
    product is ``scale * q.k`` plus the decomposed relative-position logit (MViTv2), ``d' = d + H + W``
    rounded up to a multiple of 8 with zeros."""
    height, width = size
    batch, heads, tokens, dim = query.shape
    r_h = get_rel_pos(height, height, rel_pos_h).to(query.dtype)  # [H (query row), H (key row), d]
    r_w = get_rel_pos(width, width, rel_pos_w).to(query.dtype)  # [W, W, d]
    grid_query = query.reshape(batch, heads, height, width, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_query, r_h).reshape(batch, heads, tokens, height)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_query, r_w).reshape(batch, heads, tokens, width)
    key_index = torch.arange(tokens, device=key.device)
    key_row = F.one_hot(key_index // width, height).to(key.dtype)  # [N, H]
    key_col = F.one_hot(key_index % width, width).to(key.dtype)  # [N, W]
    padding = -(dim + height + width) % HEAD_DIM_MULTIPLE
    query = torch.cat([query * scale, rel_h, rel_w, query.new_zeros(batch, heads, tokens, padding)], dim=-1)
    key_rel = torch.cat([key_row, key_col, key.new_zeros(tokens, padding)], dim=-1)  # [N, H + W + pad]
    key = torch.cat([key, key_rel.expand(batch, heads, tokens, -1)], dim=-1)
    return query, key


def set_encoder_attention(encoder: nn.Module, name: str) -> None:
    """``"sdpa"``: every attention block of a SAM image encoder runs ``SdpaRelPosAttention``;
    ``"reference"``: segment-anything's own. Weights are untouched."""
    if name not in ENCODER_ATTENTIONS:
        raise ValueError(f"SAM encoder attention must be one of {ENCODER_ATTENTIONS}, got {name!r}")
    target = SdpaRelPosAttention if name == "sdpa" else Attention
    for module in encoder.modules():
        if isinstance(module, Attention):
            module.__class__ = target
