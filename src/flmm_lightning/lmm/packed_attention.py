"""Attention over packed sequences in one SDPA call, for the Qwen vision towers on the fast path.

A Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision block attends within each image (full blocks) or each 112-px
window (Qwen2.5-VL's windowed blocks), all images packed into one ``[T, H, d]`` sequence with ``cu_seqlens``
boundaries. Outside flash-attn builds, transformers runs that as one SDPA call per sequence, after a host sync
for the lengths: a 640x480 image has 30 windows, so a batch of 8 through 32 blocks is about 7,000 small
kernels. Here the sequences are padded to the longest into ``[N, H, L, d]`` with a key-padding mask: the same
softmax over the same keys, one kernel per block, and one host sync per ``cu_seqlens`` tensor (the tower
passes two per forward, full and windowed, to all of its blocks).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

RotaryFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


@dataclass(frozen=True)
class PackedLayout:
    """Where each packed token sits in the padded batch, and back."""

    slot_index: torch.Tensor  # long [N, L]: the packed position of each padded slot (clamped in padding)
    key_mask: torch.Tensor  # bool [N, 1, 1, L]: True where the slot holds a token of that sequence
    sequence: torch.Tensor  # long [T]: the sequence each packed token belongs to
    offset: torch.Tensor  # long [T]: its slot within that sequence


# id(cu_seqlens) -> (a weak reference to it, its layout); an entry leaves when its tensor is freed. Keyed by
# id because tensors compare elementwise, which a WeakKeyDictionary's hash-collision check cannot use.
_LAYOUTS: dict[int, tuple[weakref.ref, PackedLayout]] = {}


def _forget(key: int, dead: weakref.ref) -> None:
    if key in _LAYOUTS and _LAYOUTS[key][0] is dead:
        del _LAYOUTS[key]


def packed_layout(cu_seqlens: torch.Tensor, total: int) -> PackedLayout:
    """The padded layout of ``cu_seqlens`` ([N + 1], from 0 to ``total``), memoised per tensor."""
    key = id(cu_seqlens)
    entry = _LAYOUTS.get(key)
    if entry is not None and entry[0]() is cu_seqlens:
        return entry[1]
    bounds = cu_seqlens.long()
    lengths = bounds[1:] - bounds[:-1]  # [N]
    slots = torch.arange(int(lengths.max()), device=bounds.device)  # [L]
    tokens = torch.arange(total, device=bounds.device)  # [T]
    sequence = torch.searchsorted(bounds[1:], tokens, right=True)  # [T]
    layout = PackedLayout(
        slot_index=(bounds[:-1, None] + slots).clamp(max=total - 1),
        key_mask=(slots[None, :] < lengths[:, None])[:, None, None, :],
        sequence=sequence,
        offset=tokens - bounds[sequence],
    )
    _LAYOUTS[key] = (weakref.ref(cu_seqlens, lambda dead: _forget(key, dead)), layout)
    return layout


def packed_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Bidirectional attention within each packed sequence. query/key/value: [T, H, d]; returns [T, H, d]."""
    layout = packed_layout(cu_seqlens, query.shape[0])
    # [T, H, d] -> [N, L, H, d] -> [N, H, L, d]
    padded = [states[layout.slot_index].transpose(1, 2) for states in (query, key, value)]
    attended = F.scaled_dot_product_attention(*padded, attn_mask=layout.key_mask, scale=scale)  # [N, H, L, d]
    return attended.transpose(1, 2)[layout.sequence, layout.offset]  # [T, H, d]


class PackedVisionAttention:
    """Mixin, first base of a subclass of a Qwen vision attention (``qkv``, ``proj``, ``num_heads``,
    ``scaling``): its forward, with every packed sequence in one ``packed_sdpa`` call. ``apply_rotary`` is
    that family's ``apply_rotary_pos_emb_vision``, as a staticmethod."""

    apply_rotary: RotaryFn

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        **kwargs: Any,
    ) -> torch.Tensor:
        seq_length = hidden_states.shape[0]
        qkv = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1)  # [T, 3, H, d]
        query, key, value = qkv.permute(1, 0, 2, 3).unbind(0)  # each [T, H, d]
        cos, sin = position_embeddings
        query, key = self.apply_rotary(query, key, cos, sin)
        attended = packed_sdpa(query, key, value, cu_seqlens, self.scaling)  # [T, H, d]
        return self.proj(attended.reshape(seq_length, -1))
