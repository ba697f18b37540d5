"""Panoptic narrative grounding (PNG): average recall over IoU thresholds, per object kind."""

from __future__ import annotations

import torch
from torch import Tensor

from flmm_lightning.metrics.functional import (
    PNG_SUBSETS,
    _panoptic_narrative_compute,
    _panoptic_narrative_update,
)
from flmm_lightning.metrics.summed import SummedMetric


class PanopticNarrativeRecall(SummedMetric):
    """Average recall of per-object mask IoU, as the PNG benchmark reports it.

    ``update(pred_masks, gt_masks, is_thing, is_plural)`` takes boolean ``[n, H, W]`` masks and boolean
    ``[n]`` flags. A plural phrase counts as a thing: the caller passes ``is_thing`` already True for
    plurals. ``compute()`` returns a dict of floats:

    - ``AR``: area under "fraction of objects with IoU >= t" for ``t = i * 1e-5``, ``i < 99999``
      (``sum_i 1e-5 * recall(t_i)``), as the reference's loop sums it: its last threshold, 0.99999, has no
      step and is left out, so a perfect prediction scores 0.99999. Equal to the reference's value to
      within 1e-11 (its step widths are float64 differences, not exactly 1e-5);
    - ``AR_things`` / ``AR_stuff`` / ``AR_singulars`` / ``AR_plurals``: the same on ``is_thing``,
      ``~is_thing``, ``~is_plural``, ``is_plural``; NaN for an empty subset;
    - ``Acc@0.5``: fraction of objects with IoU > 0.5 (strict);
    - ``pixel_acc``: mean per-object fraction of pixels where prediction equals truth.

    Both-empty objects have IoU 1. The AR is linear in one integer per object (how many thresholds its
    IoU reaches), so the state is a few int64/float64 sums: constant size however many objects, exact,
    and reduced across DDP ranks by torchmetrics.

    Log it like :class:`~flmm_lightning.metrics.ReferringSegmentationMetric`: ``compute()`` in
    ``on_validation_epoch_end`` on every rank, ``self.log_dict`` of the floats, then ``reset()``.
    """

    recall_counts: Tensor
    num_objects: Tensor
    hits: Tensor
    pixel_acc_sum: Tensor

    sum_states = {
        "recall_counts": ((len(PNG_SUBSETS),), torch.int64),
        "num_objects": ((len(PNG_SUBSETS),), torch.int64),
        "hits": ((), torch.int64),
        "pixel_acc_sum": ((), torch.float64),
    }

    def update(self, pred_masks: Tensor, gt_masks: Tensor, is_thing: Tensor, is_plural: Tensor) -> None:
        self.add(_panoptic_narrative_update(pred_masks, gt_masks, is_thing, is_plural))

    def compute(self) -> dict[str, float]:
        return _panoptic_narrative_compute(*self.sums())
