"""Intersection over union of boolean masks: the one implementation behind the metrics, the per-object
tables, the training statistics and SAM's candidate choice; the confidence of a predicted mask; a mask as
JSON (COCO RLE)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor


def intersection_union(pred_masks: Tensor, gt_masks: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel counts (int64 ``[...]``) of the intersection and the union of boolean ``[..., H, W]`` masks."""
    intersection = (pred_masks & gt_masks).flatten(-2).sum(-1)
    union = (pred_masks | gt_masks).flatten(-2).sum(-1)
    return intersection, union


def iou_of_counts(intersection: Tensor, union: Tensor, empty: float = 1.0) -> Tensor:
    """IoU in float64 from pixel counts; ``empty`` where the union is empty (no predicted and no true pixel):
    1 for the benchmarks (an empty prediction of an empty object is perfect), 0 in the reference's training
    statistics and candidate choice."""
    iou = intersection.double() / union.clamp(min=1).double()
    return torch.where(union > 0, iou, torch.full_like(iou, empty))


def mask_iou(pred_masks: Tensor, gt_masks: Tensor, empty: float = 1.0) -> Tensor:
    """Per-mask IoU (float64 ``[...]``) of boolean ``[..., H, W]`` masks; ``empty`` when both are empty."""
    return iou_of_counts(*intersection_union(pred_masks, gt_masks), empty=empty)


def mask_scores(logits: Tensor, masks: Tensor) -> Tensor:
    """float ``[n]``: the model's confidence in each bool ``[n, H, W]`` mask, the mean probability (sigmoid of
    the ``[n, H, W]`` logits it was cut from) over its pixels; 0 for an empty mask."""
    probabilities = torch.sigmoid(logits.float()) * masks  # [n, H, W]
    areas = masks.flatten(1).sum(1)  # [n]
    return probabilities.flatten(1).sum(1) / areas.clamp(min=1)


def mask_record(mask: Tensor, box: Sequence[float] | None) -> dict[str, object]:
    """A bool ``[H, W]`` mask for JSON: COCO RLE, its inclusive ``[x0, y0, x1, y1]`` box (null when the mask
    is empty, whatever ``box`` says), its area."""
    rle = mask_utils.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)))
    empty = box is None or not bool(mask.any())
    return {
        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
        "bbox_xyxy": None if empty else [float(v) for v in box],
        "area": int(mask.sum()),
    }
