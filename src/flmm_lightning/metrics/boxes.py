"""Referring expression comprehension scored from masks: IoU of the tight boxes, and accuracy."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from flmm_lightning.metrics.functional import _box_iou_compute, _box_iou_update


class BoxIoUMetric(Metric):
    """IoU of the tight boxes of predicted and true masks.

    This project's addition (referring expression comprehension read from masks): neither the official
    F-LMM nor its Qwen fork reports it for the fine masks. On the coarse masks it is the seed analysis's
    coarse-stage evaluation (``SplitMetrics``' ``coarse_box_*``).

    ``update(pred_masks, gt_masks)`` takes boolean ``[n, H, W]`` tensors. Each mask's box is
    ``torchvision.ops.masks_to_boxes`` (inclusive ``[x0, y0, x1, y1]``), and areas count pixels, so a box
    covers ``(x1 - x0 + 1) * (y1 - y0 + 1)``. An empty mask has no box: IoU 0 against a non-empty mask,
    1 when both are empty. ``compute()`` returns ``box_mIoU`` (mean IoU) and ``box_Acc@0.5`` (fraction
    with IoU >= 0.5), NaN before any object. O(1) state, reduced across DDP ranks by torchmetrics.

    Log it like :class:`~flmm_lightning.metrics.ReferringSegmentationMetric`: ``compute()`` in
    ``on_validation_epoch_end`` on every rank, ``self.log_dict`` of the floats, then ``reset()``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    iou_sum: Tensor
    hits: Tensor
    num_objects: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("iou_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hits", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("num_objects", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred_masks: Tensor, gt_masks: Tensor) -> None:
        iou_sum, hits, num_objects = _box_iou_update(pred_masks, gt_masks)
        self.iou_sum += iou_sum
        self.hits += hits
        self.num_objects += num_objects

    def compute(self) -> dict[str, float]:
        return _box_iou_compute(self.iou_sum, self.hits, self.num_objects)
