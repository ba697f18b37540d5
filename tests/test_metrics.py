"""Metrics against small independent numpy implementations, and the evaluation sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics import Metric

from flmm_lightning.data.sampler import UnpaddedDistributedSampler
from flmm_lightning.metrics import (
    BoxIoUMetric,
    PanopticNarrativeRecall,
    ReferringSegmentationMetric,
    SplitMetrics,
)
from flmm_lightning.metrics.functional import (
    NUM_SUMMED_THRESHOLDS,
    RECALL_STEP,
    _recall_threshold_counts,
    mask_box_iou,
)

Image = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # pred, gt [n, H, W]; is_thing, is_plural [n]


def _blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.ogrid[:h, :w]
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(0.5, h / 2 + 1), rng.uniform(0.5, w / 2 + 1)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _prediction(rng: np.random.Generator, gt: np.ndarray) -> np.ndarray:
    h, w = gt.shape
    kind = rng.integers(4)
    if kind == 0:  # a shifted copy: IoU anywhere between 0 and 1
        return np.roll(gt, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
    if kind == 1:  # spills over
        return gt | _blob(rng, h, w)
    if kind == 2:  # misses part of the object
        return gt & _blob(rng, h, w)
    return _blob(rng, h, w)


def _edge_case_image() -> Image:
    h, w = 6, 7
    empty = np.zeros((h, w), bool)
    full = np.ones((h, w), bool)
    square = empty.copy()
    square[1:4, 2:5] = True
    pixel_a, pixel_b = empty.copy(), empty.copy()
    pixel_a[0, 0] = True
    pixel_b[5, 6] = True
    pairs = [
        (empty, square),  # empty prediction
        (empty, empty),  # both empty
        (full, square),  # whole-image prediction
        (square, empty),  # empty ground truth
        (pixel_a, pixel_a),  # one-pixel object found
        (pixel_b, pixel_a),  # one-pixel object missed
        (full, full),
    ]
    pred = np.stack([p for p, _ in pairs])
    gt = np.stack([g for _, g in pairs])
    is_plural = np.array([0, 1, 0, 0, 1, 0, 0], bool)
    is_thing = is_plural | np.array([1, 0, 0, 1, 0, 0, 1], bool)
    return pred, gt, is_thing, is_plural


def make_images(seed: int, num_images: int) -> list[Image]:
    rng = np.random.default_rng(seed)
    images = [_edge_case_image()]
    for _ in range(num_images - 1):
        h, w, n = int(rng.integers(4, 20)), int(rng.integers(4, 20)), int(rng.integers(1, 6))
        gt = np.stack([_blob(rng, h, w) for _ in range(n)])
        pred = np.stack([_prediction(rng, g) for g in gt])
        is_plural = rng.random(n) < 0.3
        is_thing = is_plural | (rng.random(n) < 0.5)
        images.append((pred, gt, is_thing, is_plural))
    return images


def _objects(images: list[Image]) -> list[tuple[np.ndarray, np.ndarray, bool, bool]]:
    return [obj for image in images for obj in zip(*image, strict=True)]


def np_mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else np.logical_and(pred, gt).sum() / union


def np_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask)
    return None if ys.size == 0 else (xs.min(), ys.min(), xs.max(), ys.max())


def np_box_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    a, b = np_box(pred), np_box(gt)
    if a is None or b is None:
        return float(a is None and b is None)
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(iw, 0) * max(ih, 0)

    def area(box: tuple[int, int, int, int]) -> int:
        return (box[2] - box[0] + 1) * (box[3] - box[1] + 1)

    return inter / (area(a) + area(b) - inter)


def np_referring(images: list[Image]) -> dict[str, float]:
    objects = _objects(images)
    inter = sum(np.logical_and(p, g).sum() for p, g, _, _ in objects)
    union = sum(np.logical_or(p, g).sum() for p, g, _, _ in objects)
    ious = np.array([np_mask_iou(p, g) for p, g, _, _ in objects])
    result = {"cIoU": inter / union, "mIoU": ious.mean()}
    result.update({f"Pr@{t}": (ious >= t).mean() for t in (0.5, 0.6, 0.7, 0.8, 0.9)})
    return result


def np_boxes(images: list[Image]) -> dict[str, float]:
    ious = np.array([np_box_iou(p, g) for p, g, _, _ in _objects(images)])
    return {"box_mIoU": ious.mean(), "box_Acc@0.5": (ious >= 0.5).mean()}


def np_average_recall(ious: np.ndarray) -> float:
    """The reference's integration: recall at each threshold times the width to the next threshold."""
    if ious.size == 0:
        return math.nan
    thresholds = np.arange(0, 1, 1e-5)
    recall = (ious[None, :] >= thresholds[:, None]).mean(axis=1)
    return float((np.abs(np.diff(thresholds)) * recall[:-1]).sum())


def np_panoptic(images: list[Image]) -> dict[str, float]:
    objects = _objects(images)
    ious = np.array([np_mask_iou(p, g) for p, g, _, _ in objects])
    things = np.array([t for _, _, t, _ in objects])
    plurals = np.array([p for _, _, _, p in objects])
    return {
        "AR": np_average_recall(ious),
        "AR_things": np_average_recall(ious[things]),
        "AR_stuff": np_average_recall(ious[~things]),
        "AR_singulars": np_average_recall(ious[~plurals]),
        "AR_plurals": np_average_recall(ious[plurals]),
        "Acc@0.5": (ious > 0.5).mean(),
        "pixel_acc": np.mean([(p == g).mean() for p, g, _, _ in objects]),
    }


def _update(metric: Metric, image: Image) -> None:
    pred, gt, is_thing, is_plural = (torch.from_numpy(a) for a in image)
    if isinstance(metric, PanopticNarrativeRecall):
        metric.update(pred, gt, is_thing, is_plural)
    else:
        metric.update(pred, gt)


CASES = [
    (ReferringSegmentationMetric, np_referring),
    (BoxIoUMetric, np_boxes),
    (PanopticNarrativeRecall, np_panoptic),
]


@pytest.mark.parametrize(("metric_cls", "reference"), CASES)
def test_matches_numpy(metric_cls: type[Metric], reference) -> None:
    images = make_images(seed=0, num_images=40)
    metric = metric_cls()
    for image in images:
        _update(metric, image)
    result = metric.compute()
    expected = reference(images)
    assert result.keys() == expected.keys()
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in result.values())
    assert result == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("metric_cls", "reference"), CASES)
def test_edge_cases_alone(metric_cls: type[Metric], reference) -> None:
    images = [_edge_case_image()]
    metric = metric_cls()
    _update(metric, images[0])
    assert metric.compute() == pytest.approx(reference(images), abs=1e-6)


def _with_coarse(images: list[Image], seed: int) -> list[tuple[Image, np.ndarray]]:
    """Each image with hand-made coarse masks: another imperfect prediction per object, empty for the first
    object of every other image."""
    rng = np.random.default_rng(seed)
    result = []
    for index, image in enumerate(images):
        coarse = np.stack([_prediction(rng, g) for g in image[1]])
        if index % 2 == 0:
            coarse[0] = False
        result.append((image, coarse))
    return result


@pytest.mark.parametrize("kind", ["res", "png"])
def test_split_metrics_add_coarse_boxes_to_the_fine_figures(kind: str) -> None:
    pairs = _with_coarse(make_images(seed=4, num_images=30), seed=5)
    metrics = SplitMetrics(kind)
    for (pred, gt, is_thing, is_plural), coarse in pairs:
        metrics.update(*(torch.from_numpy(a) for a in (pred, coarse, gt, is_thing, is_plural)))
    images = [image for image, _ in pairs]
    coarse_images = [(coarse, gt, t, p) for (_, gt, t, p), coarse in pairs]
    expected = (np_panoptic if kind == "png" else np_referring)(images) | np_boxes(images)
    coarse_masks = np_referring(coarse_images)
    expected |= {"coarse_cIoU": coarse_masks["cIoU"], "coarse_mIoU": coarse_masks["mIoU"]}
    expected |= {f"coarse_{name}": value for name, value in np_boxes(coarse_images).items()}
    result = metrics.compute()
    assert result == pytest.approx(expected, abs=1e-6)
    # the empty coarse masks were scored, at box IoU 0
    num_objects = sum(len(gt) for _, gt, _, _ in images)
    coarse_box_ious = [np_box_iou(c, g) for c, g, _, _ in _objects(coarse_images)]
    assert len(coarse_box_ious) == num_objects and coarse_box_ious.count(0.0) >= len(pairs) // 2
    metrics.reset()
    assert all(math.isnan(value) for value in metrics.compute().values())


def test_empty_coarse_mask_scores_box_iou_zero() -> None:
    gt = torch.zeros(2, 5, 6, dtype=torch.bool)
    gt[:, 1:4, 2:5] = True
    coarse = gt.clone()
    coarse[1] = False  # the U-Net found nothing for the second object: no box
    metrics = SplitMetrics("res")
    flags = torch.ones(2, dtype=torch.bool)
    metrics.update(gt, coarse, gt, flags, ~flags)
    result = metrics.compute()
    assert result["coarse_box_mIoU"] == 0.5 and result["coarse_box_Acc@0.5"] == 0.5
    assert result["box_mIoU"] == 1.0 and result["coarse_mIoU"] == 0.5


def test_split_kind_is_checked() -> None:
    with pytest.raises(ValueError, match="split kind"):
        SplitMetrics("rec")


def test_edge_case_values() -> None:
    images = [_edge_case_image()]
    ious = [np_mask_iou(p, g) for p, g, _, _ in _objects(images)]
    box_ious = [np_box_iou(p, g) for p, g, _, _ in _objects(images)]
    assert ious == pytest.approx([0, 1, 9 / 42, 0, 1, 0, 1])
    assert box_ious == pytest.approx([0, 1, 9 / 42, 0, 1, 0, 1])


def test_mask_box_iou_per_object() -> None:
    images = make_images(seed=3, num_images=10)
    for pred, gt, _, _ in images:
        expected = [np_box_iou(p, g) for p, g in zip(pred, gt, strict=True)]
        got = mask_box_iou(torch.from_numpy(pred), torch.from_numpy(gt))
        assert got.dtype == torch.float64
        assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_empty_subset_is_nan() -> None:
    images = make_images(seed=1, num_images=5)
    only_things = [(p, g, np.ones_like(t), np.zeros_like(s)) for p, g, t, s in images]
    metric = PanopticNarrativeRecall()
    for image in only_things:
        _update(metric, image)
    result = metric.compute()
    assert math.isnan(result["AR_stuff"]) and math.isnan(result["AR_plurals"])
    assert result["AR_things"] == result["AR"] == result["AR_singulars"]


def test_average_recall_counts_the_thresholds_the_reference_counts() -> None:
    # IoUs 1, 0.99999 (the last threshold, which the reference's pairwise sum leaves out) and 0.5
    pred = torch.zeros(3, 1, 100_000, dtype=torch.bool)
    gt = torch.zeros_like(pred)
    gt[:, 0, :] = True
    pred[0, 0, :] = True
    pred[1, 0, :99_999] = True
    pred[2, 0, :50_000] = True
    metric = PanopticNarrativeRecall()
    flags = torch.ones(3, dtype=torch.bool)
    metric.update(pred, gt, flags, ~flags)
    ious = np.array([1.0, 0.99999, 0.5])
    assert metric.compute()["AR"] == pytest.approx(np_average_recall(ious), abs=1e-11)
    assert np_average_recall(ious[:1]) == pytest.approx(0.99999, abs=1e-11)


def test_recall_threshold_counts_are_exact() -> None:
    thresholds = np.arange(0, 1, 1e-5)[:-1]  # the thresholds the reference sums
    on_grid = np.arange(NUM_SUMMED_THRESHOLDS + 2) * RECALL_STEP
    num, den = np.meshgrid(np.arange(0, 400), np.arange(1, 400))
    rationals = (num / den)[num <= den]
    ious = np.concatenate(
        [on_grid, np.nextafter(on_grid, 0), np.nextafter(on_grid, 2), rationals, [0.0, 1.0]]
    ).clip(0, 1)
    expected = np.searchsorted(thresholds, ious, side="right")
    counts = _recall_threshold_counts(torch.from_numpy(ious)).numpy()
    np.testing.assert_array_equal(counts, expected)


@pytest.mark.parametrize(("metric_cls", "reference"), CASES)
def test_forward_gives_batch_value_and_accumulates(metric_cls: type[Metric], reference) -> None:
    images = make_images(seed=2, num_images=4)
    metric = metric_cls()
    for image in images:
        tensors = [torch.from_numpy(a) for a in image]
        args = tensors if metric_cls is PanopticNarrativeRecall else tensors[:2]
        assert metric(*args) == pytest.approx(reference([image]), abs=1e-6, nan_ok=True)
    assert metric.compute() == pytest.approx(reference(images), abs=1e-6, nan_ok=True)


def test_rejects_bad_inputs() -> None:
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="boolean"):
        ReferringSegmentationMetric().update(masks.float(), masks)
    with pytest.raises(ValueError, match="shape"):
        BoxIoUMetric().update(masks, masks[:1])
    with pytest.raises(ValueError, match="shape"):
        BoxIoUMetric().update(masks[0], masks[0])
    with pytest.raises(ValueError, match="is_plural"):
        PanopticNarrativeRecall().update(masks, masks, torch.ones(2, dtype=torch.bool), torch.ones(3))


def _state_bytes(metric: Metric) -> int:
    total = 0
    for value in metric.metric_state.values():
        for tensor in value if isinstance(value, list) else [value]:
            total += tensor.numel() * tensor.element_size()
    return total


@pytest.mark.parametrize("metric_cls", [c for c, _ in CASES])
def test_state_bytes_per_object(metric_cls: type[Metric]) -> None:
    pred = torch.zeros(2, 3, 3, dtype=torch.bool)
    gt = pred.clone()
    gt[0, 1, 1] = True
    flags = torch.tensor([True, False])
    metric = metric_cls()
    initial = _state_bytes(metric)
    num_updates = 10_000
    for _ in range(num_updates):
        if metric_cls is PanopticNarrativeRecall:
            metric.update(pred, gt, flags, flags)
        else:
            metric.update(pred, gt)
    bytes_per_object = (_state_bytes(metric) - initial) / (num_updates * pred.shape[0])
    assert bytes_per_object <= 48
    assert initial <= 256


@pytest.mark.parametrize("length", [0, 1, 2, 5, 7, 10])
@pytest.mark.parametrize("num_replicas", [1, 2, 3, 4])
def test_sampler_covers_every_index_once(length: int, num_replicas: int) -> None:
    dataset = list(range(length))
    shards = [list(UnpaddedDistributedSampler(dataset, num_replicas, rank)) for rank in range(num_replicas)]
    assert sorted(i for shard in shards for i in shard) == dataset
    sizes = [len(UnpaddedDistributedSampler(dataset, num_replicas, rank)) for rank in range(num_replicas)]
    assert sizes == [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1


def test_sampler_defaults_and_validation() -> None:
    assert list(UnpaddedDistributedSampler(range(3))) == [0, 1, 2]
    with pytest.raises(ValueError):
        UnpaddedDistributedSampler(range(3), num_replicas=2, rank=2)
    with pytest.raises(ValueError):
        UnpaddedDistributedSampler(range(3), num_replicas=0, rank=0)
