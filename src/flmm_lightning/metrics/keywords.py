"""Keyword selection: which phrases of a text name something to ground, against the annotated ones."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flmm_lightning.metrics.functional import _keyword_selection_compute, _keyword_selection_update
from flmm_lightning.metrics.summed import SummedMetric


class KeywordSelectionMetric(SummedMetric):
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

    token_hits: Tensor
    token_pred: Tensor
    token_target: Tensor
    phrase_hits: Tensor
    phrase_pred: Tensor
    phrase_target: Tensor

    sum_states = {
        name: ((), torch.int64)
        for name in (
            "token_hits",
            "token_pred",
            "token_target",
            "phrase_hits",
            "phrase_pred",
            "phrase_target",
        )
    }

    def update(self, pred_spans: Sequence[tuple[int, int]], target_spans: Sequence[tuple[int, int]]) -> None:
        self.add(_keyword_selection_update(pred_spans, target_spans))

    def compute(self) -> dict[str, float]:
        return _keyword_selection_compute(*self.sums())
