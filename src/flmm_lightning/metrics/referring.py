"""Referring expression segmentation (RefCOCO family): cIoU, mIoU and precision at IoU thresholds."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from flmm_lightning.metrics.functional import (
    PR_THRESHOLDS,
    _referring_segmentation_compute,
    _referring_segmentation_update,
)


class ReferringSegmentationMetric(Metric):
    """Mask IoU statistics over every object of a split.

    ``update(pred_masks, gt_masks)`` takes boolean ``[n, H, W]`` tensors (the objects of one image, or any
    batch of same-size masks). ``compute()`` returns a dict of floats:

    - ``cIoU``: sum of intersections / sum of unions over all objects;
    - ``mIoU``: mean per-object IoU;
    - ``Pr@0.5`` ... ``Pr@0.9``: fraction of objects with IoU >= the threshold.

    An object whose prediction and ground truth are both empty has IoU 1 and adds 0/0 to cIoU. With no
    objects (or only empty ones for cIoU) the value is NaN. The state is a handful of sums (int64 pixel
    and object counts, a float64 IoU sum), reduced across DDP ranks by torchmetrics.

    Lightning logs a ``Metric`` object only when its ``compute()`` is a scalar, so log the floats at the end
    of the epoch and reset; every rank must call ``compute()``, which synchronises the state::

        def validation_step(self, batch, batch_idx):
            self.val_res.update(pred_masks, gt_masks)

        def on_validation_epoch_end(self):
            self.log_dict({f"val/{k}": v for k, v in self.val_res.compute().items()})
            self.val_res.reset()
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    intersection: Tensor
    union: Tensor
    iou_sum: Tensor
    hits: Tensor
    num_objects: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("intersection", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("union", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("iou_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hits", torch.zeros(len(PR_THRESHOLDS), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("num_objects", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred_masks: Tensor, gt_masks: Tensor) -> None:
        intersection, union, iou_sum, hits, num_objects = _referring_segmentation_update(pred_masks, gt_masks)
        self.intersection += intersection
        self.union += union
        self.iou_sum += iou_sum
        self.hits += hits
        self.num_objects += num_objects

    def compute(self) -> dict[str, float]:
        return _referring_segmentation_compute(
            self.intersection, self.union, self.iou_sum, self.hits, self.num_objects
        )
