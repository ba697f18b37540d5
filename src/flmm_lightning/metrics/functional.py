"""Functional halves of the grounding metrics.

Each ``_*_update`` turns one batch of masks (or one text's phrase spans) into sufficient statistics and
each ``_*_compute`` turns the accumulated statistics into the reported numbers. Every statistic is a sum
(the PNG average recall too, see ``_recall_threshold_counts``), so the metric classes keep O(1) state
reduced with ``"sum"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import masks_to_boxes

from flmm_lightning.common.masks import intersection_union, iou_of_counts

PR_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
BOX_ACC_THRESHOLD = 0.5
PNG_ACC_THRESHOLD = 0.5
RECALL_STEP = 1e-5
NUM_RECALL_THRESHOLDS = 100_000  # len(np.arange(0, 1, RECALL_STEP))
# The reference integrates recall over consecutive threshold pairs, so the last threshold (0.99999) has no
# step of its own and is never counted.
NUM_SUMMED_THRESHOLDS = NUM_RECALL_THRESHOLDS - 1
# Order of the rows in the PNG subset statistics; "" is every object.
PNG_SUBSETS: tuple[str, ...] = ("", "_things", "_stuff", "_singulars", "_plurals")
# Order of the rows in the ReasonSeg subset statistics; "" is every query.
REASONSEG_SUBSETS: tuple[str, ...] = ("", "_short", "_long")


def _check_masks(pred_masks: Tensor, gt_masks: Tensor) -> None:
    if pred_masks.dtype != torch.bool or gt_masks.dtype != torch.bool:
        raise ValueError(f"Expected boolean masks, got {pred_masks.dtype} and {gt_masks.dtype}")
    if pred_masks.ndim != 3 or pred_masks.shape != gt_masks.shape:
        raise ValueError(
            "Expected masks of the same shape [n, H, W], "
            f"got {tuple(pred_masks.shape)} and {tuple(gt_masks.shape)}"
        )


def _check_flags(name: str, flags: Tensor, n: int) -> None:
    if flags.dtype != torch.bool or flags.shape != (n,):
        raise ValueError(
            f"Expected `{name}` to be a boolean tensor of shape ({n},), "
            f"got {flags.dtype} {tuple(flags.shape)}"
        )


def _ratio(numerator: Tensor, denominator: Tensor) -> float:
    denominator_ = float(denominator)
    return float(numerator) / denominator_ if denominator_ else math.nan


def _referring_segmentation_update(
    pred_masks: Tensor, gt_masks: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Return the summed intersection, union and IoU, the number of objects at or above each of
    ``PR_THRESHOLDS``, and the number of objects."""
    _check_masks(pred_masks, gt_masks)
    intersection, union = intersection_union(pred_masks, gt_masks)
    iou = iou_of_counts(intersection, union)
    thresholds = torch.tensor(PR_THRESHOLDS, dtype=torch.float64, device=iou.device)
    hits = (iou[:, None] >= thresholds).sum(0)
    num_objects = torch.tensor(iou.numel(), dtype=torch.int64, device=iou.device)
    return intersection.sum(), union.sum(), iou.sum(), hits, num_objects


def _referring_segmentation_compute(
    intersection: Tensor, union: Tensor, iou_sum: Tensor, hits: Tensor, num_objects: Tensor
) -> dict[str, float]:
    result = {"cIoU": _ratio(intersection, union), "mIoU": _ratio(iou_sum, num_objects)}
    result.update({f"Pr@{t:g}": _ratio(h, num_objects) for t, h in zip(PR_THRESHOLDS, hits, strict=True)})
    return result


def mask_box_iou(pred_masks: Tensor, gt_masks: Tensor) -> Tensor:
    """Per-object IoU (float64 [n]) of the tight boxes of two boolean ``[n, H, W]`` mask stacks, on
    inclusive pixel areas; an empty mask has no box (IoU 0, or 1 when both are empty)."""
    _check_masks(pred_masks, gt_masks)
    # masks_to_boxes gives [x0, y0, x1, y1] with inclusive corners; its float coordinates are exact integers.
    pred_boxes = masks_to_boxes(pred_masks).long()
    gt_boxes = masks_to_boxes(gt_masks).long()
    top_left = torch.maximum(pred_boxes[:, :2], gt_boxes[:, :2])
    bottom_right = torch.minimum(pred_boxes[:, 2:], gt_boxes[:, 2:])
    intersection = (bottom_right - top_left + 1).clamp(min=0).prod(1)
    pred_area = (pred_boxes[:, 2:] - pred_boxes[:, :2] + 1).prod(1)
    gt_area = (gt_boxes[:, 2:] - gt_boxes[:, :2] + 1).prod(1)
    iou = intersection.double() / (pred_area + gt_area - intersection).double()
    # An empty mask gets the box [0, 0, 0, 0] from masks_to_boxes, which is a real one-pixel box.
    pred_empty = ~pred_masks.flatten(1).any(1)
    gt_empty = ~gt_masks.flatten(1).any(1)
    return torch.where(pred_empty | gt_empty, (pred_empty & gt_empty).double(), iou)


def _box_iou_update(pred_masks: Tensor, gt_masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return the summed box IoU, the number of objects with box IoU >= ``BOX_ACC_THRESHOLD`` and the
    number of objects."""
    iou = mask_box_iou(pred_masks, gt_masks)
    num_objects = torch.tensor(iou.numel(), dtype=torch.int64, device=iou.device)
    return iou.sum(), (iou >= BOX_ACC_THRESHOLD).sum(), num_objects


def _box_iou_compute(iou_sum: Tensor, hits: Tensor, num_objects: Tensor) -> dict[str, float]:
    return {
        "box_mIoU": _ratio(iou_sum, num_objects),
        f"box_Acc@{BOX_ACC_THRESHOLD:g}": _ratio(hits, num_objects),
    }


def _recall_threshold_counts(iou: Tensor) -> Tensor:
    """Per object, how many of the summed thresholds ``t_i = i * RECALL_STEP`` (i < ``NUM_SUMMED_THRESHOLDS``,
    the values of ``np.arange(0, 1, RECALL_STEP)[:-1]``) satisfy ``t_i <= iou``.

    The reference's PNG average recall is ``sum_{i < N-1} |t_{i+1} - t_i| * mean(iou >= t_i)`` over the
    ``N = NUM_RECALL_THRESHOLDS`` thresholds. With every step taken as ``RECALL_STEP`` this is ``RECALL_STEP
    * sum(counts) / n``: a sum over objects, so no per-object state and no loop over thresholds. The
    reference's float64 step widths differ from ``RECALL_STEP`` by at most 7e-17 each, 3.3e-12 in all, which
    bounds the difference in AR.
    """
    last = torch.floor(iou / RECALL_STEP).long()
    # The division and the rounded products i * RECALL_STEP can disagree by one step right at a threshold;
    # settle it against the very products the reference compares with.
    last = last + ((last + 1).double() * RECALL_STEP <= iou).long()
    last = last - (last.double() * RECALL_STEP > iou).long()
    return (last + 1).clamp(min=0, max=NUM_SUMMED_THRESHOLDS)


def _panoptic_narrative_update(
    pred_masks: Tensor, gt_masks: Tensor, is_thing: Tensor, is_plural: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return, per row of ``PNG_SUBSETS``, the summed recall-threshold counts and the number of objects;
    then the number of objects with IoU > ``PNG_ACC_THRESHOLD`` and the summed pixel accuracy."""
    _check_masks(pred_masks, gt_masks)
    _check_flags("is_thing", is_thing, pred_masks.shape[0])
    _check_flags("is_plural", is_plural, pred_masks.shape[0])
    intersection, union = intersection_union(pred_masks, gt_masks)
    iou = iou_of_counts(intersection, union)
    counts = _recall_threshold_counts(iou)
    everything = torch.ones_like(is_thing)
    subsets = torch.stack([everything, is_thing, ~is_thing, ~is_plural, is_plural])
    recall_counts = (subsets * counts).sum(1)
    num_objects = subsets.sum(1)
    hits = (iou > PNG_ACC_THRESHOLD).sum()
    num_pixels = pred_masks.shape[1] * pred_masks.shape[2]
    # Pixels where prediction and truth agree are those outside the symmetric difference.
    pixel_acc = 1.0 - (union - intersection).double() / num_pixels
    return recall_counts, num_objects, hits, pixel_acc.sum()


def _panoptic_narrative_compute(
    recall_counts: Tensor, num_objects: Tensor, hits: Tensor, pixel_acc_sum: Tensor
) -> dict[str, float]:
    result = {
        f"AR{suffix}": RECALL_STEP * _ratio(count, n)
        for suffix, count, n in zip(PNG_SUBSETS, recall_counts, num_objects, strict=True)
    }
    result[f"Acc@{PNG_ACC_THRESHOLD:g}"] = _ratio(hits, num_objects[0])
    result["pixel_acc"] = _ratio(pixel_acc_sum, num_objects[0])
    return result


def _reasonseg_update(
    pred_masks: Tensor, gt_masks: Tensor, is_sentence: Tensor, ignore_masks: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return, per row of ``REASONSEG_SUBSETS``, the summed intersection, union and IoU and the number of
    queries; ``ignore_masks`` pixels count in neither the intersection nor the union."""
    _check_masks(pred_masks, gt_masks)
    _check_flags("is_sentence", is_sentence, pred_masks.shape[0])
    if ignore_masks is not None:
        _check_masks(ignore_masks, gt_masks)
        pred_masks, gt_masks = pred_masks & ~ignore_masks, gt_masks & ~ignore_masks
    intersection, union = intersection_union(pred_masks, gt_masks)
    iou = iou_of_counts(intersection, union)
    subsets = torch.stack([torch.ones_like(is_sentence), ~is_sentence, is_sentence])  # bool [3, n]
    return (subsets * intersection).sum(1), (subsets * union).sum(1), (subsets * iou).sum(1), subsets.sum(1)


def _reasonseg_compute(
    intersection: Tensor, union: Tensor, iou_sum: Tensor, num_queries: Tensor
) -> dict[str, float]:
    result = {}
    for k, suffix in enumerate(REASONSEG_SUBSETS):
        result[f"gIoU{suffix}"] = _ratio(iou_sum[k], num_queries[k])
        result[f"cIoU{suffix}"] = _ratio(intersection[k], union[k])
    return result


def _check_spans(spans: Sequence[tuple[int, int]], name: str) -> list[tuple[int, int]]:
    """``spans`` sorted; each non-empty, none overlapping another."""
    ordered = sorted((int(start), int(end)) for start, end in spans)
    for start, end in ordered:
        if not 0 <= start < end:
            raise ValueError(f"{name}: span ({start}, {end}) is empty or negative")
    for (_, end), (start, _) in zip(ordered, ordered[1:], strict=False):
        if start < end:
            raise ValueError(f"{name}: spans overlap in {ordered}")
    return ordered


def _keyword_selection_update(
    pred_spans: Sequence[tuple[int, int]], target_spans: Sequence[tuple[int, int]]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Return the counts of one text: tokens in both a predicted and a target phrase, tokens predicted,
    tokens in target phrases; then phrases matching a target phrase exactly, phrases predicted, target
    phrases. Spans are half-open ``(start, end)`` positions, disjoint within each list."""
    pred = _check_spans(pred_spans, "pred_spans")
    target = _check_spans(target_spans, "target_spans")
    overlap = sum(
        max(0, min(p_end, t_end) - max(p_start, t_start))
        for p_start, p_end in pred
        for t_start, t_end in target
    )
    counts = (
        overlap,
        sum(end - start for start, end in pred),
        sum(end - start for start, end in target),
        len(set(pred) & set(target)),
        len(pred),
        len(target),
    )
    return tuple(torch.tensor(count, dtype=torch.int64) for count in counts)


def _keyword_selection_compute(
    token_hits: Tensor,
    token_pred: Tensor,
    token_target: Tensor,
    phrase_hits: Tensor,
    phrase_pred: Tensor,
    phrase_target: Tensor,
) -> dict[str, float]:
    result = {}
    for level, hits, pred, target in (
        ("token", token_hits, token_pred, token_target),
        ("phrase", phrase_hits, phrase_pred, phrase_target),
    ):
        result[f"{level}_precision"] = _ratio(hits, pred)
        result[f"{level}_recall"] = _ratio(hits, target)
        # 2PR/(P+R) written on counts: defined (0) when nothing is predicted but targets exist.
        result[f"{level}_F1"] = _ratio(2 * hits, pred + target)
    return result
