"""Reading a batched LMM forward back per sample: the positions of the rows that matter, the tokens of each
object, and the per-object merge of their attention maps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MERGE_MODES = ("mean", "max")


def padded_positions(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of each row, in order, right-padded with 0: ([B, K] long, counts [B])."""
    counts = selected.sum(dim=1)  # [B]
    width = int(counts.max())
    # A stable sort on "not selected" brings the selected positions to the front in sequence order.
    order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :width]  # [B, K]
    valid = torch.arange(width, device=selected.device)[None, :] < counts[:, None]  # [B, K]
    return torch.where(valid, order, torch.zeros_like(order)), counts


def tokens_by_object(token_objects: torch.Tensor, item: int) -> tuple[torch.Tensor, list[int]]:
    """Host-side grouping of a sample's phrase tokens by the object they describe.

    token_objects: long ``[t]`` (CPU), object index per phrase token. Returns the token positions ordered by
    object, in sequence order within an object (``[t]``), and every object's token count.
    """
    counts = torch.bincount(token_objects, minlength=int(token_objects.max()) + 1).tolist()
    empty = [k for k, count in enumerate(counts) if count == 0]
    if empty:
        raise ValueError(f"batch item {item}: objects {empty} own no tokens")
    return torch.argsort(token_objects, stable=True), counts


@dataclass
class TokenReadout:
    """What one forward of the frozen LMM read from a batch (``HFGroundingAdapter.read``): at the attention
    rows, the probabilities over the image tokens; at the hidden-state rows, the layer-mixed hidden states.
    Positions and counts are host tensors, right-padded like ``padded_positions``."""

    attention: torch.Tensor  # [B, L, H, T, N]
    attention_positions: torch.Tensor  # long [B, T]: sequence position of each attention row
    attention_counts: torch.Tensor  # long [B]
    image_token_counts: torch.Tensor  # long [B]
    mixed: torch.Tensor  # [B, T_h, D]: softmax(text_layer_weights)-weighted hidden states (differentiable)
    hidden_positions: torch.Tensor  # long [B, T_h]: sequence position of each hidden-state row
    hidden_counts: torch.Tensor  # long [B]


@dataclass
class FrozenReadout:
    """``TokenReadout`` before the trainable layer weights mix the hidden states (``read_frozen``): computed
    without gradients, a function of the batch and the frozen LMM alone."""

    attention: torch.Tensor  # [B, L, H, T, N]
    attention_positions: torch.Tensor  # long [B, T]
    attention_counts: torch.Tensor  # long [B]
    image_token_counts: torch.Tensor  # long [B]
    hidden: torch.Tensor  # [L, B, T_h, D]: the last L layers' hidden states at the LMM's dtype
    hidden_positions: torch.Tensor  # long [B, T_h]
    hidden_counts: torch.Tensor  # long [B]


def merge_object_tokens(
    attn: torch.Tensor, order: torch.Tensor, counts: list[int], merge: str
) -> torch.Tensor:
    """Per-object ``merge`` (one of ``MERGE_MODES``) of the phrase-token maps ``attn`` ``[L, H, t, N]`` ->
    ``[n, L, H, N]``; ``order`` and ``counts`` as ``tokens_by_object`` returns them.

    One gather of every object's tokens, padded to the longest object, then one masked reduction.
    """
    num_objects, longest = len(counts), max(counts)
    index = torch.zeros(num_objects, longest, dtype=torch.long)  # [n, t_max] into the t axis
    valid = torch.zeros(num_objects, longest, dtype=torch.bool)  # [n, t_max]
    start = 0
    for k, count in enumerate(counts):
        index[k, :count] = order[start : start + count]
        valid[k, :count] = True
        start += count
    index, valid = index.to(attn.device), valid.to(attn.device)
    tokens = attn[:, :, index].permute(2, 0, 1, 3, 4)  # [n, L, H, t_max, N]
    valid = valid[:, None, None, :, None]  # [n, 1, 1, t_max, 1]
    if merge == "mean":
        sizes = torch.tensor(counts, dtype=attn.dtype, device=attn.device)[:, None, None, None]
        return torch.where(valid, tokens, 0.0).sum(dim=3) / sizes
    return tokens.masked_fill(~valid, float("-inf")).amax(dim=3)
