"""Referring expression segmentation (RefCOCO family): cIoU, mIoU and precision at IoU thresholds."""

from __future__ import annotations

import torch
from torch import Tensor

from flmm_lightning.metrics.functional import (
    PR_THRESHOLDS,
    _referring_segmentation_compute,
    _referring_segmentation_update,
)
from flmm_lightning.metrics.summed import SummedMetric


class ReferringSegmentationMetric(SummedMetric):
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

    intersection: Tensor
    union: Tensor
    iou_sum: Tensor
    hits: Tensor
    num_objects: Tensor

    sum_states = {
        "intersection": ((), torch.int64),
        "union": ((), torch.int64),
        "iou_sum": ((), torch.float64),
        "hits": ((len(PR_THRESHOLDS),), torch.int64),
        "num_objects": ((), torch.int64),
    }

    def update(self, pred_masks: Tensor, gt_masks: Tensor) -> None:
        self.add(_referring_segmentation_update(pred_masks, gt_masks))

    def compute(self) -> dict[str, float]:
        return _referring_segmentation_compute(*self.sums())
