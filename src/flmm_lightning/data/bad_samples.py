"""What a dataset does with a sample it cannot load, and the epoch-end summary of what it left out.

A dataset raises ``BadSampleError`` under ``on_bad_sample="raise"``; under ``"skip"`` its ``__getitem__``
returns the error as a ``SkippedSample`` instead, which travels with the batch so that it gets counted.
A skipped sample is never replaced by another one: that would silently change what an evaluation measures.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Literal, Protocol, TypeVar

from flmm_lightning.boundaries import GroundingSample, SkippedSample

logger = logging.getLogger(__name__)

OnBadSample = Literal["raise", "skip"]
ON_BAD_SAMPLE_CHOICES: tuple[str, ...] = ("raise", "skip")


class BadSampleReason(StrEnum):
    """The categories a summary counts; the free-text detail stays in the error message."""

    MISSING_FILE = "missing file"
    UNREADABLE_IMAGE = "unreadable image"
    SIZE_MISMATCH = "size mismatch"
    MISSING_ANNOTATION = "missing annotation"
    MALFORMED_ANNOTATION = "malformed annotation"
    MISSING_SEGMENT = "segment absent"
    EMPTY_MASK = "empty mask"


class BadSampleError(Exception):
    """A sample that cannot be loaded; the message names the dataset, the sample id and the file."""

    def __init__(self, dataset: str, sample_id: str, path: str, reason: BadSampleReason, detail: str) -> None:
        self.dataset = dataset
        self.sample_id = sample_id
        self.path = path
        self.reason = reason
        self.detail = detail
        super().__init__(f"{dataset}: sample {sample_id}: {reason}: {detail} (file: {path})")

    def __reduce__(self) -> tuple:
        # Exceptions pickle through their args by default; this one crosses the dataloader worker boundary.
        return (type(self), (self.dataset, self.sample_id, self.path, self.reason, self.detail))

    def to_skipped(self) -> SkippedSample:
        return SkippedSample(self.dataset, self.sample_id, self.path, str(self.reason))


def check_on_bad_sample(value: str) -> OnBadSample:
    if value not in ON_BAD_SAMPLE_CHOICES:
        raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE_CHOICES}, got {value!r}")
    return value  # type: ignore[return-value]


def apply_policy(error: BadSampleError, on_bad_sample: OnBadSample) -> SkippedSample:
    """Re-raises under ``"raise"``; under ``"skip"`` logs the full detail and returns the marker."""
    if on_bad_sample == "raise":
        raise error
    logger.warning("skipping bad sample: %s", error)
    return error.to_skipped()


class IndexedItem(Protocol):
    """A dataset's index entry: what it found wrong with the sample while indexing, if anything."""

    @property
    def problem(self) -> BadSampleError | None: ...


Item = TypeVar("Item", bound=IndexedItem)


def load_or_skip(
    load: Callable[[Item], GroundingSample], item: Item, on_bad_sample: OnBadSample
) -> GroundingSample | SkippedSample:
    """``load(item)`` under the bad-sample policy (``apply_policy``): the problem found while indexing the
    item, or a ``BadSampleError`` that ``load`` raises, is raised or returned as a ``SkippedSample``."""
    try:
        if item.problem is not None:
            raise item.problem
        return load(item)
    except BadSampleError as error:
        return apply_policy(error, on_bad_sample)


class BadSampleSummary:
    """Skipped samples counted per (dataset, reason), with one example file each, for an epoch-end table."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.examples: dict[tuple[str, str], str] = {}

    def add(self, skipped: SkippedSample) -> None:
        key = (skipped.dataset, skipped.reason)
        self.counts[key] += 1
        self.examples.setdefault(key, skipped.path)

    def update(self, items: Iterable[object]) -> None:
        """Counts the ``SkippedSample`` items among ``items`` (anything else is ignored)."""
        for item in items:
            if isinstance(item, SkippedSample):
                self.add(item)

    def merge(self, other: BadSampleSummary) -> None:
        self.counts.update(other.counts)
        for key, path in other.examples.items():
            self.examples.setdefault(key, path)

    def reset(self) -> None:
        self.counts.clear()
        self.examples.clear()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def per_reason(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for (_, reason), count in self.counts.items():
            totals[reason] += count
        return dict(totals)

    def __len__(self) -> int:
        return self.total

    def __str__(self) -> str:
        if not self.counts:
            return "no skipped samples"
        header = ("dataset", "reason", "count", "example file")
        rows = [
            (dataset, reason, str(count), self.examples[(dataset, reason)])
            for (dataset, reason), count in sorted(self.counts.items())
        ]
        rows.append(("total", "", str(self.total), ""))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(row: tuple[str, ...]) -> str:
            return "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()

        rule = "  ".join("-" * width for width in widths)
        return "\n".join([line(header), rule, *(line(row) for row in rows[:-1]), rule, line(rows[-1])])
