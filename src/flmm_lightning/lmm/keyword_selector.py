"""The keyword selector (F-LMM paper): which answer tokens name something in the image to ground."""

from __future__ import annotations

import torch
from torch import nn


class KeywordSelector(nn.Module):
    """A small trainable head on the frozen LMM's layer-weighted hidden states: one logit per token.

    Input: the softmax-weighted sum of the last layers' hidden states of each token, the same ``mixed``
    tensor the adapter feeds to ``text_proj`` (``[T, D]`` or ``[B, T, D]``); output: logits ``[T]`` or
    ``[B, T]``, each token scored on its own hidden state (padding cannot change another token's score).

    Small on purpose: the frozen LMM has already read the image and the sentence, so whether a token names
    something visible is close to a linear read-out of its state, and the labels (PNG narratives) are a few
    thousand texts in one style; a deep head would learn that style instead. The LayerNorm gives the linear
    layers inputs of one scale: the residual-stream states it reads differ in norm by orders of magnitude
    between tokens, layers and LMM families.
    """

    def __init__(self, hidden_size: int, width: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = hidden_states.to(self.norm.weight.dtype)  # [..., T, D]
        return self.mlp(self.norm(hidden)).squeeze(-1)  # [..., T]
