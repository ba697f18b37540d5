"""Reasoning segmentation (ReasonSeg): gIoU and cIoU per query, overall and for short and long queries."""

from __future__ import annotations

import torch
from torch import Tensor

from flmm_lightning.metrics.functional import REASONSEG_SUBSETS, _reasonseg_compute, _reasonseg_update
from flmm_lightning.metrics.summed import SummedMetric


class ReasonSegMetric(SummedMetric):
    """Mask IoU statistics over every query of a ReasonSeg split.

    ``update(pred_masks, gt_masks, is_sentence, ignore_masks=None)`` takes boolean ``[n, H, W]`` masks of
    ``n`` queries, a boolean ``[n]`` flag for long (sentence) queries, and optionally boolean ``[n, H, W]``
    pixels to leave out (the benchmark's ``ignore`` regions): they count in neither the intersection nor the
    union. ``compute()`` returns a dict of floats:

    - ``gIoU``: mean per-query IoU;
    - ``cIoU``: sum of intersections / sum of unions over all queries;
    - ``gIoU_short`` / ``cIoU_short``, ``gIoU_long`` / ``cIoU_long``: the same over the short (phrase) and the
      long (sentence) queries; NaN for a subset without queries.

    A query whose prediction and ground truth are both empty (after removing ignored pixels) has IoU 1 and
    adds 0/0 to cIoU, as in the benchmark's evaluation (LISA adds 1 to the IoU of a query with an empty
    union). The state is a few int64/float64 sums, reduced across DDP ranks by torchmetrics.

    Log it like :class:`~flmm_lightning.metrics.ReferringSegmentationMetric`: ``compute()`` in
    ``on_validation_epoch_end`` on every rank, ``self.log_dict`` of the floats, then ``reset()``.
    """

    intersection: Tensor
    union: Tensor
    iou_sum: Tensor
    num_queries: Tensor

    sum_states = {
        "intersection": ((len(REASONSEG_SUBSETS),), torch.int64),
        "union": ((len(REASONSEG_SUBSETS),), torch.int64),
        "iou_sum": ((len(REASONSEG_SUBSETS),), torch.float64),
        "num_queries": ((len(REASONSEG_SUBSETS),), torch.int64),
    }

    def update(
        self, pred_masks: Tensor, gt_masks: Tensor, is_sentence: Tensor, ignore_masks: Tensor | None = None
    ) -> None:
        self.add(_reasonseg_update(pred_masks, gt_masks, is_sentence, ignore_masks))

    def compute(self) -> dict[str, float]:
        return _reasonseg_compute(*self.sums())
