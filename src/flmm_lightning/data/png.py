"""Panoptic Narrative Grounding: narratives over COCO panoptic segments."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from flmm_lightning.data.images import load_panoptic_ids, load_rgb_image
from flmm_lightning.data.records import parse_id, read_field, read_json, read_records

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Segment:
    utterance: str
    segment_ids: tuple[int, ...]  # empty: not grounded
    plural: bool
    is_thing: bool


@dataclass(frozen=True)
class _Narrative:
    sample_id: str
    image_id: int | str
    file_name: str
    panoptic_file_name: str
    width: int
    height: int
    segments: tuple[_Segment, ...]
    # A problem found while indexing; under on_bad_sample="skip" it is reported when the item is read.
    problem: BadSampleError | None = None


def _as_image_id(value: Any) -> int | str:
    text = str(value)
    return int(text) if text.isdigit() else text


class PNGDataset(Dataset):
    """One sample per narrative; each item a ``GroundingSample`` (or a ``SkippedSample``).

    ``narratives_json`` is a list of ``{image_id, caption, segments: [{utterance, segment_ids, plural,
    noun}]}``. Every utterance goes into ``utterances`` in order; a segment with ``segment_ids`` is an
    object whose mask is the union of those panoptic segments (segment id = R + 256*G + 256^2*B of the
    panoptic PNG named by ``panoptic_json``'s ``annotations[].file_name``). ``is_thing`` is True for a
    plural phrase, else the ``isthing`` of the category of the object's first segment. ``object_ids`` are
    the segment ids joined by "+".

    A narrative that grounds nothing has no object to learn from or to evaluate: it is dropped when the
    index is built, counted in ``num_ungrounded_dropped`` and logged once; never replaced by another item.
    """

    # How an evaluation split of this dataset is scored (panoptic narrative grounding: average recall).
    eval_kind = "png"

    def __init__(
        self,
        narratives_json: str | Path,
        panoptic_json: str | Path,
        panoptic_dir: str | Path,
        image_dir: str | Path,
        on_bad_sample: OnBadSample = "raise",
    ) -> None:
        self.on_bad_sample = check_on_bad_sample(on_bad_sample)
        self.narratives_path = Path(narratives_json)
        self.panoptic_path = Path(panoptic_json)
        self.panoptic_dir = Path(panoptic_dir)
        self.image_dir = Path(image_dir)
        self.name = self.narratives_path.stem

        narratives = read_json(self.narratives_path)
        if not isinstance(narratives, list):
            found = type(narratives).__name__
            raise ValueError(f"{self.narratives_path}: expected a list of narratives, found a {found}")
        panoptic = read_json(self.panoptic_path)
        images, annotations, isthing = self._index_panoptic(panoptic)

        self._items: list[_Narrative] = []
        self.num_ungrounded_dropped = 0
        for index, narrative in enumerate(narratives):
            narrative = self._checked_narrative(narrative, index)
            if not any(segment["segment_ids"] for segment in narrative["segments"]):
                self.num_ungrounded_dropped += 1
                continue
            item = self._make_item(narrative, images, annotations, isthing)
            if item.problem is not None and self.on_bad_sample == "raise":
                raise item.problem
            self._items.append(item)
        if self.num_ungrounded_dropped:
            logger.warning(
                "%s: dropped %d of %d narratives that ground no segment",
                self.narratives_path,
                self.num_ungrounded_dropped,
                len(narratives),
            )

    def _checked_narrative(self, narrative: Any, index: int) -> dict[str, Any]:
        """A narrative with the fields the dataset reads, its segment ids as integers; ``RecordError`` names
        the file, the narrative and the field."""
        path = self.narratives_path
        image_id = read_field(narrative, "image_id", (int, str), path, f"narrative #{index}")
        where = f"narrative #{index} (image_id={image_id})"
        segments = []
        for number, segment in enumerate(read_field(narrative, "segments", (list,), path, where)):
            at = f"{where}, segments[{number}]"
            utterance = read_field(segment, "utterance", (str,), path, at)
            plural = read_field(segment, "plural", (bool,), path, at)
            raw_ids = read_field(segment, "segment_ids", (list,), path, at)
            ids = [parse_id(value, path, at, f"segment_ids[{k}]") for k, value in enumerate(raw_ids)]
            segments.append({"utterance": utterance, "plural": plural, "segment_ids": ids})
        return {"image_id": image_id, "segments": segments}

    def _index_panoptic(self, panoptic: Any) -> tuple[dict[str, dict], dict[str, dict], dict[int, bool]]:
        """The panoptic JSON's images and annotations by image id (as text), each category's ``isthing``;
        every field the dataset reads is checked (a ``RecordError`` names the file, record and field)."""
        path = self.panoptic_path
        images = {}
        for index, image in enumerate(read_records(panoptic, "images", path)):
            image_id = read_field(image, "id", (int, str), path, f"images[{index}]")
            where = f"images[{index}] (id={image_id})"
            read_field(image, "file_name", (str,), path, where)
            for field in ("width", "height"):
                read_field(image, field, (int,), path, where)
            images[str(image_id)] = image
        annotations = {}
        for index, annotation in enumerate(read_records(panoptic, "annotations", path)):
            image_id = read_field(annotation, "image_id", (int, str), path, f"annotations[{index}]")
            where = f"annotations[{index}] (image_id={image_id})"
            read_field(annotation, "file_name", (str,), path, where)
            for number, info in enumerate(read_field(annotation, "segments_info", (list,), path, where)):
                for field in ("id", "category_id"):
                    read_field(info, field, (int,), path, f"{where}, segments_info[{number}]")
            annotations[str(image_id)] = annotation
        isthing = {}
        for index, category in enumerate(read_records(panoptic, "categories", path)):
            category_id = read_field(category, "id", (int,), path, f"categories[{index}]")
            where = f"categories[{index}] (id={category_id})"
            isthing[category_id] = bool(read_field(category, "isthing", (int, bool), path, where))
        return images, annotations, isthing

    def _make_item(
        self,
        narrative: dict[str, Any],
        images: dict[str, dict],
        annotations: dict[str, dict],
        isthing: dict[int, bool],
    ) -> _Narrative:
        key = str(narrative["image_id"])
        sample_id = f"image_id={key}"
        image, annotation = images.get(key), annotations.get(key)
        categories = (
            {info["id"]: info["category_id"] for info in annotation["segments_info"]} if annotation else {}
        )
        segments = []
        problem = None
        if image is None or annotation is None:
            detail = f"image_id {key} is not in {self.panoptic_path}"
            problem = self._indexing_error(sample_id, BadSampleReason.MISSING_ANNOTATION, detail)
        for raw in narrative["segments"]:
            segment_ids = tuple(raw["segment_ids"])
            unknown = [segment_id for segment_id in segment_ids if segment_id not in categories]
            if unknown and problem is None:
                problem = self._indexing_error(
                    sample_id,
                    BadSampleReason.MISSING_SEGMENT,
                    f"segment ids {unknown} of {raw['utterance']!r} are not in the segments_info "
                    f"of image {key} in {self.panoptic_path}",
                )
            plural = bool(raw["plural"])
            is_thing = plural or (not unknown and bool(segment_ids) and isthing[categories[segment_ids[0]]])
            segments.append(_Segment(raw["utterance"], segment_ids, plural, is_thing))
        return _Narrative(
            sample_id=sample_id,
            image_id=_as_image_id(key),
            file_name=image["file_name"] if image else "",
            panoptic_file_name=annotation["file_name"] if annotation else "",
            width=int(image["width"]) if image else 0,
            height=int(image["height"]) if image else 0,
            segments=tuple(segments),
            problem=problem,
        )

    def _indexing_error(self, sample_id: str, reason: BadSampleReason, detail: str) -> BadSampleError:
        return BadSampleError(self.name, sample_id, str(self.panoptic_path), reason, detail)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> GroundingSample | SkippedSample:
        return load_or_skip(self._load, self._items[index], self.on_bad_sample)

    def _load(self, item: _Narrative) -> GroundingSample:
        size = (item.width, item.height)
        image = load_rgb_image(
            self.image_dir / item.file_name, dataset=self.name, sample_id=item.sample_id, expected_wh=size
        )
        panoptic_path = self.panoptic_dir / item.panoptic_file_name
        ids = load_panoptic_ids(panoptic_path, dataset=self.name, sample_id=item.sample_id, expected_wh=size)
        present = set(np.unique(ids).tolist())

        utterances: list[tuple[str, int]] = []
        grounded: list[_Segment] = []
        masks: list[np.ndarray] = []
        for segment in item.segments:
            if not segment.segment_ids:
                utterances.append((segment.utterance, NOT_GROUNDED))
                continue
            absent = [segment_id for segment_id in segment.segment_ids if segment_id not in present]
            if absent:
                detail = f"segment ids {absent} of {segment.utterance!r} do not occur in the panoptic PNG"
                reason = BadSampleReason.MISSING_SEGMENT
                raise BadSampleError(self.name, item.sample_id, str(panoptic_path), reason, detail)
            utterances.append((segment.utterance, len(grounded)))
            grounded.append(segment)
            masks.append(np.isin(ids, segment.segment_ids))

        return GroundingSample(
            image=image,
            phrases=[segment.utterance for segment in grounded],
            masks=torch.from_numpy(np.stack(masks)),
            is_thing=torch.tensor([segment.is_thing for segment in grounded], dtype=torch.bool),
            is_plural=torch.tensor([segment.plural for segment in grounded], dtype=torch.bool),
            image_id=item.image_id,
            file_name=item.file_name,
            object_ids=["+".join(map(str, segment.segment_ids)) for segment in grounded],
            utterances=utterances,
            narrative=True,
        )
