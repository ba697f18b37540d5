"""The keyword selection metric against counts by hand and per position, and exact across 2 gloo ranks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from gloo import results_of_gloo_ranks

from flmm_lightning.data.sampler import UnpaddedDistributedSampler
from flmm_lightning.metrics import KeywordSelectionMetric


def test_hand_counted_example():
    metric = KeywordSelectionMetric()
    # Text 1, tokens 0..9. Predicted [1,3) [5,8); target [1,3) [4,6) [8,9).
    # Tokens: predicted 2+3=5, target 2+2+1=5, in both: {1,2} + {5} = 3. Phrases: 1 of 2 predicted match.
    metric.update([(5, 8), (1, 3)], [(1, 3), (4, 6), (8, 9)])
    # Text 2: nothing predicted, one target of 4 tokens.
    metric.update([], [(0, 4)])
    # Text 3: one predicted phrase, no target.
    metric.update([(2, 3)], [])
    # Tokens: hits 3, predicted 5+0+1 = 6, target 5+4+0 = 9. Phrases: hits 1, predicted 3, target 4.
    assert metric.compute() == pytest.approx(
        {
            "token_precision": 3 / 6,
            "token_recall": 3 / 9,
            "token_F1": 2 * (3 / 6) * (3 / 9) / (3 / 6 + 3 / 9),
            "phrase_precision": 1 / 3,
            "phrase_recall": 1 / 4,
            "phrase_F1": 2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4),
        },
        abs=1e-15,
    )


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_empty_cases():
    metric = KeywordSelectionMetric()
    result = metric.compute()
    assert all(math.isnan(value) for value in result.values())
    metric.update([], [(0, 2)])
    result = metric.compute()
    assert (
        math.isnan(result["phrase_precision"]) and result["phrase_recall"] == 0 and result["phrase_F1"] == 0
    )


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        ([(0, 2), (1, 3)], [], "pred_spans: spans overlap"),
        ([], [(2, 2)], "target_spans: span \\(2, 2\\) is empty"),
    ],
)
def test_bad_spans_are_refused(pred, target, message):
    with pytest.raises(ValueError, match=message):
        KeywordSelectionMetric().update(pred, target)


def random_spans(rng: np.random.Generator, length: int) -> list[tuple[int, int]]:
    """Disjoint spans in ``[0, length)``: runs of a random labelling, cut at random places."""
    spans, position = [], 0
    while position < length:
        size = int(rng.integers(1, 4))
        if rng.random() < 0.5:
            spans.append((position, min(length, position + size)))
        position += size + int(rng.integers(0, 2))
    return spans


def text_item(index: int, seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    rng = np.random.default_rng((seed, index))
    length = int(rng.integers(0, 30))
    target = random_spans(rng, length)
    # Predictions share some target spans exactly, others at random.
    pred = (
        [span for span in target if rng.random() < 0.5] if rng.random() < 0.5 else random_spans(rng, length)
    )
    return pred, target


def per_position_result(items) -> dict[str, float]:
    """The same numbers from boolean positions and span sets, written independently of the metric."""
    token = np.zeros(3, dtype=np.int64)
    phrase = np.zeros(3, dtype=np.int64)
    for pred, target in items:
        length = max([end for _, end in pred + target], default=0)
        pred_flags, target_flags = np.zeros(length, bool), np.zeros(length, bool)
        for start, end in pred:
            pred_flags[start:end] = True
        for start, end in target:
            target_flags[start:end] = True
        token += [(pred_flags & target_flags).sum(), pred_flags.sum(), target_flags.sum()]
        phrase += [len(set(pred) & set(target)), len(pred), len(target)]
    result = {}
    for level, (hits, predicted, targets) in (("token", token), ("phrase", phrase)):
        precision, recall = hits / predicted, hits / targets
        result |= {
            f"{level}_precision": precision,
            f"{level}_recall": recall,
            f"{level}_F1": 2 * precision * recall / (precision + recall),
        }
    return result


def test_random_texts_against_per_position_counts():
    items = [text_item(i) for i in range(40)]
    metric = KeywordSelectionMetric()
    for pred, target in items:
        metric.update(pred, target)
    assert metric.compute() == pytest.approx(per_position_result(items), abs=1e-12)


# (number of texts, indices of rank 0, indices of rank 1); None = UnpaddedDistributedSampler's shards.
SCENARIOS: list[tuple[int, list[int] | None, list[int] | None]] = [
    (9, None, None),
    (9, [0, 1, 2, 3, 4, 5, 6, 7], [8]),
    (1, None, None),  # rank 1 gets nothing
]


def _keywords_of_rank(rank: int) -> list[dict[str, float]]:
    results = []
    for length, *shards in SCENARIOS:
        texts = list(range(length))
        indices = shards[rank] if shards[rank] is not None else UnpaddedDistributedSampler(texts)
        metric = KeywordSelectionMetric()
        for index in indices:
            metric.update(*text_item(index))
        results.append(metric.compute())
    return results


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_exact_across_two_gloo_ranks(tmp_path: Path):
    expected = []
    for length, *_ in SCENARIOS:
        metric = KeywordSelectionMetric()
        for index in range(length):
            metric.update(*text_item(index))
        expected.append(metric.compute())
    for results in results_of_gloo_ranks(_keywords_of_rank, tmp_path):
        for result, want in zip(results, expected, strict=True):
            assert result == pytest.approx(want, abs=0, nan_ok=True)
