"""Attention capture: the softmax probabilities of selected query rows over selected key columns, every layer.

Two exact, interchangeable ways (``build_capture("eager" | "fused")``):

- ``eager``: the reference's way. The model runs eager attention with ``output_attentions=True``, every layer
  materialises its full ``[B, H, S, S]`` probabilities, and the rows/columns are gathered afterwards.
- ``fused``: the language model runs under a registered attention function (``"flmm_capture"``) that delegates
  its output to SDPA and, on the side, recomputes only the selected query rows' probabilities over all keys in
  fp32 (same causal/padding mask), keeping the selected columns. Costs ``B x H x T x S`` per layer instead of
  ``B x H x S x S`` and keeps the fused kernel for the output.

Both return ``[B, L, H, T, N]`` for query positions ``[B, T]`` and key positions ``[B, N]``; padded entries
point at any valid position and are for the caller to ignore.
"""

from __future__ import annotations

import contextvars
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.utils import ModelOutput

from flmm_lightning.lmm.compat import register_sdpa_like_attention, sdpa_attention_forward

CAPTURE_ATTENTION = "flmm_capture"


def gather_rows_cols(attn: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """``attn[b, h, query_pos[b, t], key_pos[b, n]]``: [B, H, Q, K] -> [B, H, T, N]."""
    batch, heads, _, k_len = attn.shape
    t, n = query_pos.shape[1], key_pos.shape[1]
    rows = attn.gather(2, query_pos[:, None, :, None].expand(batch, heads, t, k_len))  # [B, H, T, K]
    return rows.gather(3, key_pos[:, None, None, :].expand(batch, heads, t, n))  # [B, H, T, N]


class _Recorder:
    """Selection for one forward, and the per-layer probabilities the attention function leaves here."""

    def __init__(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> None:
        self.query_positions = query_positions  # long [B, T]
        self.key_positions = key_positions  # long [B, N]
        self.layers: dict[int, torch.Tensor] = {}  # layer index -> float32 [B, H, T, N]

    def stacked(self) -> torch.Tensor:
        if not self.layers:
            raise RuntimeError(
                f"no attention was captured: the LMM does not run '{CAPTURE_ATTENTION}' attention"
            )
        return torch.stack([self.layers[i] for i in sorted(self.layers)], dim=1)  # [B, L, H, T, N]


_ACTIVE: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("flmm_capture", default=None)


def selected_attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
) -> torch.Tensor:
    """Softmax probabilities of the selected query rows over all keys, in fp32, kept at the selected columns.

    query: [B, H, Q, d]; key: [B, H_kv, K, d]; attention_mask: None (plain causal), bool [B, 1, Q, K] (True =
    attend) or additive float [B, 1, Q, K]. Returns float32 [B, H, T, N].
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    n_rep = heads // kv_heads
    t, n = query_positions.shape[1], key_positions.shape[1]
    rows = query_positions[:, None, :, None]  # [B, 1, T, 1]

    # fp32 whatever the trainer's mixed precision: autocast would run the matmul in bf16.
    with torch.autocast(device_type=query.device.type, enabled=False):
        q_sel = query.gather(2, rows.expand(batch, heads, t, head_dim))  # [B, H, T, d]
        # GQA without materialising repeated keys: query head h reads kv head h // n_rep.
        q_sel = q_sel.float().view(batch, kv_heads, n_rep * t, head_dim)  # [B, H_kv, n_rep*T, d]
        scores = torch.matmul(q_sel, key.float().transpose(2, 3)) * scaling  # [B, H_kv, n_rep*T, K]
        scores = scores.view(batch, heads, t, k_len)  # [B, H, T, K]

        if attention_mask is None:
            # SDPA got ``is_causal``: a query at i (offset by any cached prefix) sees keys 0..i.
            q_abs = query_positions + (k_len - q_len)  # [B, T]
            key_idx = torch.arange(k_len, device=query.device)  # [K]
            allowed = key_idx[None, None, :] <= q_abs[:, :, None]  # [B, T, K]
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        else:
            mask_rows = attention_mask.gather(2, rows.expand(batch, attention_mask.shape[1], t, k_len))
            # mask_rows: [B, 1, T, K]
            if mask_rows.dtype == torch.bool:
                scores = scores.masked_fill(~mask_rows, float("-inf"))
            else:
                scores = scores + mask_rows.float()

        probs = torch.softmax(scores, dim=-1)  # [B, H, T, K]
    return probs.gather(3, key_positions[:, None, None, :].expand(batch, heads, t, n))  # [B, H, T, N]


def capture_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA attention that also records the selected probabilities of decoder self-attention layers."""
    recorder = _ACTIVE.get()
    # The vision tower's (bidirectional) attention may route here too when the implementation is set globally.
    if recorder is not None and getattr(module, "is_causal", False):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        recorder.layers[module.layer_idx] = selected_attention_probs(
            query, key, attention_mask, scale, recorder.query_positions, recorder.key_positions
        )
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


register_sdpa_like_attention(CAPTURE_ATTENTION, capture_attention_forward)


@contextmanager
def recording(query_positions: torch.Tensor, key_positions: torch.Tensor) -> Iterator[_Recorder]:
    """Within this block, ``flmm_capture`` attention records the given rows/columns of every decoder layer."""
    recorder = _Recorder(query_positions, key_positions)
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


class AttentionCapture(ABC):
    """How a frozen LMM is loaded and run so that its phrase-row x image-column attention comes out."""

    name: str

    @property
    @abstractmethod
    def attn_implementation(self) -> str | dict[str, str]:
        """``attn_implementation`` for ``from_pretrained`` (per sub-config where it matters)."""

    @abstractmethod
    def run(
        self, model: nn.Module, inputs: dict, query_positions: torch.Tensor, key_positions: torch.Tensor
    ) -> tuple[ModelOutput, torch.Tensor]:
        """``model(**inputs)`` plus the captured probabilities [B, L, H, T, N] (model dtype or fp32)."""


class EagerCapture(AttentionCapture):
    name = "eager"

    @property
    def attn_implementation(self) -> str:
        return "eager"

    def run(
        self, model: nn.Module, inputs: dict, query_positions: torch.Tensor, key_positions: torch.Tensor
    ) -> tuple[ModelOutput, torch.Tensor]:
        outputs = model(**inputs, output_attentions=True)
        maps = torch.stack(
            [gather_rows_cols(attn, query_positions, key_positions) for attn in outputs.attentions], dim=1
        )  # [B, L, H, T, N]
        outputs.attentions = None
        return outputs, maps


class FusedCapture(AttentionCapture):
    name = "fused"

    @property
    def attn_implementation(self) -> dict[str, str]:
        return {"": "sdpa", "vision_config": "sdpa", "text_config": CAPTURE_ATTENTION}

    def run(
        self, model: nn.Module, inputs: dict, query_positions: torch.Tensor, key_positions: torch.Tensor
    ) -> tuple[ModelOutput, torch.Tensor]:
        with recording(query_positions, key_positions) as recorder:
            outputs = model(**inputs)
        return outputs, recorder.stacked()


CAPTURES: dict[str, type[AttentionCapture]] = {"eager": EagerCapture, "fused": FusedCapture}


def build_capture(name: str) -> AttentionCapture:
    if name not in CAPTURES:
        raise ValueError(f"capture must be one of {sorted(CAPTURES)}, got {name!r}")
    return CAPTURES[name]()
