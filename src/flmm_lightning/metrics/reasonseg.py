"""Reasoning segmentation (ReasonSeg): gIoU and cIoU per query, overall and for short and long queries."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from flmm_lightning.metrics.functional import REASONSEG_SUBSETS, _reasonseg_compute, _reasonseg_update


class ReasonSegMetric(Metric):
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

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    intersection: Tensor
    union: Tensor
    iou_sum: Tensor
    num_queries: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        num_subsets = len(REASONSEG_SUBSETS)
        self.add_state("intersection", torch.zeros(num_subsets, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("union", torch.zeros(num_subsets, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("iou_sum", torch.zeros(num_subsets, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_queries", torch.zeros(num_subsets, dtype=torch.int64), dist_reduce_fx="sum")

    def update(
        self, pred_masks: Tensor, gt_masks: Tensor, is_sentence: Tensor, ignore_masks: Tensor | None = None
    ) -> None:
        intersection, union, iou_sum, num_queries = _reasonseg_update(
            pred_masks, gt_masks, is_sentence, ignore_masks
        )
        self.intersection += intersection
        self.union += union
        self.iou_sum += iou_sum
        self.num_queries += num_queries

    def compute(self) -> dict[str, float]:
        return _reasonseg_compute(self.intersection, self.union, self.iou_sum, self.num_queries)
