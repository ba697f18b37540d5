"""Referring expression comprehension scored from masks: IoU of the tight boxes, and accuracy."""

from __future__ import annotations

import torch
from torch import Tensor

from flmm_lightning.metrics.functional import _box_iou_compute, _box_iou_update
from flmm_lightning.metrics.summed import SummedMetric


class BoxIoUMetric(SummedMetric):
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

    iou_sum: Tensor
    hits: Tensor
    num_objects: Tensor

    sum_states = {
        "iou_sum": ((), torch.float64),
        "hits": ((), torch.int64),
        "num_objects": ((), torch.int64),
    }

    def update(self, pred_masks: Tensor, gt_masks: Tensor) -> None:
        self.add(_box_iou_update(pred_masks, gt_masks))

    def compute(self) -> dict[str, float]:
        return _box_iou_compute(*self.sums())
