"""ReasonSegMetric against an independent numpy computation in the benchmark's own terms (a label map in
which ignored pixels carry 255 and are removed from the prediction too)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flmm_lightning.metrics import SPLIT_KINDS, ReasonSegMetric, SplitMetrics

IGNORE = 255
Query = tuple[np.ndarray, np.ndarray, np.ndarray, bool]  # pred, gt, ignore (bool [H, W]), is_sentence


def make_queries(seed: int, count: int, size: tuple[int, int] | None = None) -> list[Query]:
    rng = np.random.default_rng(seed)
    queries = []
    for _ in range(count):
        h, w = size or (int(rng.integers(3, 12)), int(rng.integers(3, 12)))
        gt = rng.random((h, w)) < rng.uniform(0, 0.6)
        pred = gt ^ (rng.random((h, w)) < rng.uniform(0, 0.5))
        ignore = rng.random((h, w)) < rng.uniform(0, 0.3) if rng.random() < 0.7 else np.zeros((h, w), bool)
        queries.append((pred, gt, ignore, bool(rng.random() < 0.5)))
    return queries


def np_reasonseg(queries: list[Query]) -> dict[str, float]:
    """Per query: the target label map (0 / 1 / 255), the prediction set to 255 where the target is, then
    foreground intersection and union from the label areas."""
    rows: dict[str, list[tuple[int, int, float]]] = {"": [], "_short": [], "_long": []}
    for pred, gt, ignore, is_sentence in queries:
        target = np.where(ignore, IGNORE, gt.astype(np.int64))
        output = np.where(target == IGNORE, IGNORE, pred.astype(np.int64))
        intersection = int(np.sum((output == 1) & (target == 1)))
        union = int(np.sum(output == 1)) + int(np.sum(target == 1)) - intersection
        iou = intersection / union if union else 1.0
        for key in ("", "_long" if is_sentence else "_short"):
            rows[key].append((intersection, union, iou))
    result = {}
    for key, values in rows.items():
        result[f"gIoU{key}"] = float(np.mean([v[2] for v in values])) if values else math.nan
        unions = sum(v[1] for v in values)
        result[f"cIoU{key}"] = sum(v[0] for v in values) / unions if unions else math.nan
    return result


def update(metric: ReasonSegMetric, queries: list[Query]) -> None:
    """Queries of the same size go in together, as the queries of one image would."""
    for pred, gt, ignore, is_sentence in queries:
        metric.update(
            torch.from_numpy(pred[None]),
            torch.from_numpy(gt[None]),
            torch.tensor([is_sentence]),
            torch.from_numpy(ignore[None]),
        )


def test_matches_numpy() -> None:
    queries = make_queries(seed=0, count=40)
    assert {q[3] for q in queries} == {True, False}
    metric = ReasonSegMetric()
    update(metric, queries)
    result = metric.compute()
    assert list(result) == ["gIoU", "cIoU", "gIoU_short", "cIoU_short", "gIoU_long", "cIoU_long"]
    assert result == pytest.approx(np_reasonseg(queries), abs=1e-12)


def test_forward_gives_the_batch_value_and_accumulates() -> None:
    queries = make_queries(seed=2, count=6)
    metric = ReasonSegMetric()
    for pred, gt, ignore, is_sentence in queries:
        batch = metric(
            torch.from_numpy(pred[None]),
            torch.from_numpy(gt[None]),
            torch.tensor([is_sentence]),
            torch.from_numpy(ignore[None]),
        )
        assert batch == pytest.approx(np_reasonseg([(pred, gt, ignore, is_sentence)]), abs=1e-12, nan_ok=True)
    assert metric.compute() == pytest.approx(np_reasonseg(queries), abs=1e-12, nan_ok=True)


def test_several_queries_in_one_update_equal_one_at_a_time() -> None:
    queries = make_queries(seed=1, count=12, size=(5, 6))
    queries += [(np.zeros((5, 6), bool), np.zeros((5, 6), bool), np.ones((5, 6), bool), True)]
    metric = ReasonSegMetric()
    metric.update(
        torch.from_numpy(np.stack([q[0] for q in queries])),
        torch.from_numpy(np.stack([q[1] for q in queries])),
        torch.tensor([q[3] for q in queries]),
        torch.from_numpy(np.stack([q[2] for q in queries])),
    )
    assert metric.compute() == pytest.approx(np_reasonseg(queries), abs=1e-12)


def test_ignored_pixels_count_nowhere_and_empty_union_is_perfect() -> None:
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, :2, :2] = True  # 4 target pixels
    pred = torch.zeros(1, 4, 4, dtype=torch.bool)
    pred[0, :2, :] = True  # the target and 4 more pixels, 2 of them ignored
    ignore = torch.zeros(1, 4, 4, dtype=torch.bool)
    ignore[0, :2, 2] = True
    metric = ReasonSegMetric()
    metric.update(pred, gt, torch.tensor([False]), ignore)
    assert metric.compute()["gIoU"] == pytest.approx(4 / 6)
    metric.update(pred, gt, torch.tensor([False]))  # without ignore: 4 / 8
    assert metric.compute()["gIoU_short"] == pytest.approx((4 / 6 + 4 / 8) / 2)
    # A query whose every predicted and true pixel is ignored: IoU 1, nothing added to cIoU.
    metric.update(pred, torch.zeros_like(gt), torch.tensor([True]), pred)
    result = metric.compute()
    assert result["gIoU_long"] == 1.0 and math.isnan(result["cIoU_long"])
    assert result["cIoU"] == pytest.approx((4 + 4) / (6 + 8))


def test_empty_subset_is_nan() -> None:
    metric = ReasonSegMetric()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert all(math.isnan(v) for v in metric.compute().values())
    metric.update(
        torch.ones(2, 3, 3, dtype=torch.bool), torch.ones(2, 3, 3, dtype=torch.bool), torch.ones(2) > 0
    )
    result = metric.compute()
    assert result["gIoU"] == result["gIoU_long"] == result["cIoU_long"] == 1.0
    assert math.isnan(result["gIoU_short"]) and math.isnan(result["cIoU_short"])


def test_rejects_bad_inputs() -> None:
    metric = ReasonSegMetric()
    masks = torch.zeros(2, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="is_sentence"):
        metric.update(masks, masks, torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_sentence"):
        metric.update(masks, masks, torch.zeros(2))
    with pytest.raises(ValueError, match="same shape"):
        metric.update(masks, masks, torch.zeros(2, dtype=torch.bool), torch.zeros(2, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean masks"):
        metric.update(masks, masks, torch.zeros(2, dtype=torch.bool), torch.zeros(2, 3, 3))


def test_a_reasonseg_split_scores_fine_and_coarse_masks_without_boxes() -> None:
    """``SplitMetrics("reasonseg")`` (an evaluation split of ReasonSeg queries): the benchmark's figures on
    the fine masks, gIoU and cIoU of the coarse ones, ignored pixels left out of both."""
    assert "reasonseg" in SPLIT_KINDS
    fine_queries = make_queries(seed=3, count=20, size=(6, 7))
    rng = np.random.default_rng(4)
    coarse_queries = [(rng.random(p.shape) < 0.4, g, i, s) for p, g, i, s in fine_queries]
    metrics = SplitMetrics("reasonseg")
    for (fine, gt, ignore, is_sentence), (coarse, *_) in zip(fine_queries, coarse_queries, strict=True):
        unused = torch.zeros(1, dtype=torch.bool)
        masks = (torch.from_numpy(m[None]) for m in (fine, coarse, gt))
        metrics.update(*masks, unused, unused, torch.tensor([is_sentence]), torch.from_numpy(ignore[None]))
    expected = np_reasonseg(fine_queries)
    coarse_expected = np_reasonseg(coarse_queries)
    expected |= {f"coarse_{name}": coarse_expected[name] for name in ("gIoU", "cIoU")}
    assert metrics.compute() == pytest.approx(expected, abs=1e-12)
    metrics.reset()
    assert all(math.isnan(value) for value in metrics.compute().values())
    with pytest.raises(ValueError, match="needs is_sentence"):
        gt = torch.ones(1, 2, 2, dtype=torch.bool)
        metrics.update(gt, gt, gt, torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool))
