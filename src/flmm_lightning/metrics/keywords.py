"""Keyword selection: which phrases of a text name something to ground, against the annotated ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from flmm_lightning.metrics.functional import _keyword_selection_compute, _keyword_selection_update


class KeywordSelectionMetric(Metric):
    """Precision, recall and F1 of selected phrases, per token and per phrase.

    ``update(pred_spans, target_spans)`` takes one text's phrases as half-open ``(start, end)`` spans, each
    list disjoint: token spans over the answer or narrative tokens (training), or character spans (the
    selected phrases' ``char_span`` against ``narrative_phrase_spans``). ``compute()`` returns a dict of
    floats:

    - ``token_precision`` / ``token_recall`` / ``token_F1``: over the positions the spans cover (tokens, or
      characters for character spans);
    - ``phrase_precision`` / ``phrase_recall`` / ``phrase_F1``: a predicted phrase counts when its span
      equals a target phrase's span exactly.

    F1 is ``2·hits / (predicted + target)``: 0 when nothing is predicted but targets exist, NaN only when
    both are empty; precision (recall) is NaN with nothing predicted (no targets). The state is six int64
    counts, summed across DDP ranks, so the result is exact however the texts are sharded. Log it like
    :class:`~flmm_lightning.metrics.ReferringSegmentationMetric`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    token_hits: Tensor
    token_pred: Tensor
    token_target: Tensor
    phrase_hits: Tensor
    phrase_pred: Tensor
    phrase_target: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in (
            "token_hits",
            "token_pred",
            "token_target",
            "phrase_hits",
            "phrase_pred",
            "phrase_target",
        ):
            self.add_state(name, torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred_spans: Sequence[tuple[int, int]], target_spans: Sequence[tuple[int, int]]) -> None:
        token_hits, token_pred, token_target, phrase_hits, phrase_pred, phrase_target = (
            count.to(self.device) for count in _keyword_selection_update(pred_spans, target_spans)
        )
        self.token_hits += token_hits
        self.token_pred += token_pred
        self.token_target += token_target
        self.phrase_hits += phrase_hits
        self.phrase_pred += phrase_pred
        self.phrase_target += phrase_target

    def compute(self) -> dict[str, float]:
        return _keyword_selection_compute(
            self.token_hits,
            self.token_pred,
            self.token_target,
            self.phrase_hits,
            self.phrase_pred,
            self.phrase_target,
        )
