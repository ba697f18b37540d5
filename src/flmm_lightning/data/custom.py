"""Your own data in the simple format (``data/custom_format.py``; the guide: docs/own-data.md)."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from flmm_lightning.boundaries import NOT_GROUNDED, GroundingSample, SkippedSample
from flmm_lightning.data.bad_samples import (
    BadSampleError,
    BadSampleReason,
    OnBadSample,
    check_on_bad_sample,
    load_or_skip,
)
from flmm_lightning.data.custom_format import (
    ImageRecord,
    Problem,
    check_pixels,
    decode_object_mask,
    image_path,
    read_records,
)
from flmm_lightning.data.images import load_rgb_image
from flmm_lightning.data.refcoco import TEXT_MODES, TextMode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Item:
    sample_id: str
    record: ImageRecord | None
    problem: BadSampleError | None = None


def _as_image_id(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _object_key(object_id: str) -> int:
    """The integer that seeds an object's sentence draw: the id itself when it is a number (a RefCOCO ref
    id, so that an exported RefCOCO split draws the same sentences as the RefCOCO loader), else its CRC."""
    return int(object_id) if object_id.isdigit() else zlib.crc32(object_id.encode("utf-8"))


class CustomDataset(Dataset):
    """One split in the simple format; each item a ``GroundingSample`` (or a ``SkippedSample``).

    Relative image paths are read under ``image_root`` (default: the file's folder). ``check_images=True``
    reads every image and decodes every mask when the dataset is built, so that a bad record stops a run
    before its first step (``on_bad_sample="raise"``), or is left out and reported when its turn comes
    (``"skip"``). ``text_mode`` picks the phrases of an object with several, as ``RefCocoDataset``'s does
    (keyed by the object's id). A narrative record (with a ``caption``) is one sample whose utterances are
    the caption cut at its objects' spans.
    """

    def __init__(
        self,
        path: str | Path | None,
        image_root: str | Path | None = None,
        text_mode: TextMode = "first",
        on_bad_sample: OnBadSample = "raise",
        check_images: bool = True,
        seed: int = 0,
    ) -> None:
        if text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
        if not path:
            raise ValueError(
                "no file given: data=custom needs data.custom.train=<file> and data.custom.val=<file>"
            )
        self.on_bad_sample = check_on_bad_sample(on_bad_sample)
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root else self.path.parent
        self.text_mode = text_mode
        self.seed = seed
        self.epoch = 0
        self.name = self.path.stem
        records, problems = read_records(self.path)
        if check_images:
            for record in records:
                problems.extend(check_pixels(record, self.image_root, str(self.path), self.name).problems)
        by_line: dict[int, list[Problem]] = {}
        for problem in problems:
            by_line.setdefault(problem.line, []).append(problem)
        if by_line and self.on_bad_sample == "raise":
            listed = "\n".join(str(problem) for problem in problems[:20])
            more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise BadSampleError(
                self.name,
                f"line {min(by_line)}",
                str(self.path),
                BadSampleReason.MALFORMED_ANNOTATION,
                f"{len(by_line)} bad record(s) (python -m flmm_lightning.data.check {self.path}):\n"
                f"{listed}{more}",
            )
        good = {record.line: record for record in records if record.line not in by_line}
        self._items = [
            _Item(f"line {line}", good.get(line), self._problem(line, by_line.get(line)))
            for line in sorted({*good, *by_line})
        ]
        if by_line:
            logger.warning("%s: %d bad record(s) will be skipped and reported", self.path, len(by_line))

    def _problem(self, line: int, problems: list[Problem] | None) -> BadSampleError | None:
        if not problems:
            return None
        detail = "; ".join(f"{problem.field}: {problem.message}" for problem in problems)
        reason = BadSampleReason.MALFORMED_ANNOTATION
        return BadSampleError(self.name, f"line {line}", str(self.path), reason, detail)

    @property
    def eval_kind(self) -> str:
        """``"png"`` (average recall) for narrative records, ``"res"`` (cIoU, mIoU) for phrase records."""
        kinds = {record.narrative for record in (item.record for item in self._items) if record is not None}
        if len(kinds) > 1:
            raise ValueError(
                f"{self.path} mixes narrative (caption) and phrase records: they are scored differently, "
                "put them in two files to evaluate them"
            )
        return "png" if kinds == {True} else "res"

    def __len__(self) -> int:
        return len(self._items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> GroundingSample | SkippedSample:
        return load_or_skip(self._load, self._items[index], self.on_bad_sample)

    def _load(self, item: _Item) -> GroundingSample:
        record = item.record
        assert record is not None  # an item without a record carries its problem
        image = load_rgb_image(
            image_path(record, self.image_root),
            dataset=self.name,
            sample_id=item.sample_id,
            expected_wh=record.size,
        )
        masks = []
        for k, obj in enumerate(record.objects):
            mask, message = decode_object_mask(obj, image.width, image.height)
            if mask is None:
                reason = BadSampleReason.MALFORMED_ANNOTATION
                raise BadSampleError(
                    self.name, item.sample_id, str(self.path), reason, f"objects[{k}]: {message}"
                )
            masks.append(mask)
        if record.narrative:
            return self._narrative_sample(record, image, masks)
        phrases, chosen, object_ids = [], [], []
        for obj, mask in zip(record.objects, masks, strict=True):
            for phrase in self._choose_phrases(obj.id, obj.phrases):
                phrases.append(phrase)
                chosen.append((obj, mask))
                object_ids.append(obj.id)
        return GroundingSample(
            image=image,
            phrases=phrases,
            masks=torch.from_numpy(np.stack([mask for _, mask in chosen])),
            is_thing=torch.tensor([obj.is_thing for obj, _ in chosen], dtype=torch.bool),
            is_plural=torch.tensor([obj.plural for obj, _ in chosen], dtype=torch.bool),
            image_id=_as_image_id(record.id),
            file_name=record.image,
            object_ids=object_ids,
        )

    def _narrative_sample(self, record: ImageRecord, image, masks: list[np.ndarray]) -> GroundingSample:
        caption = str(record.caption)
        order = sorted(range(len(record.objects)), key=lambda k: record.objects[k].span)
        utterances: list[tuple[str, int]] = []
        position = 0
        for index, k in enumerate(order):
            start, end = record.objects[k].span
            if start > position:
                utterances.append((caption[position:start], NOT_GROUNDED))
            utterances.append((caption[start:end], index))
            position = end
        if position < len(caption):
            utterances.append((caption[position:], NOT_GROUNDED))
        objects = [record.objects[k] for k in order]
        return GroundingSample(
            image=image,
            phrases=[obj.phrases[0] for obj in objects],
            masks=torch.from_numpy(np.stack([masks[k] for k in order])),
            is_thing=torch.tensor([obj.is_thing or obj.plural for obj in objects], dtype=torch.bool),
            is_plural=torch.tensor([obj.plural for obj in objects], dtype=torch.bool),
            image_id=_as_image_id(record.id),
            file_name=record.image,
            object_ids=[obj.id for obj in objects],
            utterances=utterances,
            narrative=True,
        )

    def _choose_phrases(self, object_id: str, phrases: tuple[str, ...]) -> tuple[str, ...]:
        if self.text_mode == "first":
            return phrases[:1]
        if self.text_mode == "all":
            return phrases
        per_epoch = [self.epoch] if self.text_mode == "random_per_epoch" else []
        key = [self.seed, *per_epoch, _object_key(object_id)]
        return (phrases[int(np.random.default_rng(key).integers(len(phrases)))],)
