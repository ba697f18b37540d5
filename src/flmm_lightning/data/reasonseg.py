"""ReasonSeg (LISA's reasoning segmentation benchmark) in its released layout, and its prompt protocol.

Layout: one folder per split (``train/``, ``val/``, ``test/``) holding, per image, ``<name>.jpg`` and
``<name>.json``. The JSON is labelme-style::

    {"text": ["query", ...] or "query", "is_sentence": true|false,
     "shapes": [{"label": "target"|"ignore"|"flag"|..., "points": [[x, y], ...], "shape_type": "polygon"}]}

Label semantics follow the benchmark's own loader: a label containing "ignore" (any case) marks pixels left
out of the metric, the label "flag" is a deprecated annotation and is skipped, every other label is target.
Where shapes overlap, the smaller one decides: shapes are painted from the largest to the smallest area
(ties: the one listed first is painted last).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from flmm_lightning.boundaries import GroundingSample, SkippedSample
from flmm_lightning.data.bad_samples import (
    BadSampleError,
    BadSampleReason,
    OnBadSample,
    check_on_bad_sample,
    load_or_skip,
)
from flmm_lightning.data.images import load_rgb_image

# The ``eval_kind`` of a reasoning split: each query is answered by the LMM and segmented from its answer,
# so its samples reach the evaluation step unencoded (``datamodule.GroundingDataModule.is_reasoning``).
REASONING_KIND = "reasonseg"

# The reference protocol (F-LMM's ReasonSeg evaluation with a frozen LMM): a short query is asked about,
# a sentence query is asked as it is; the answer is forced to start with ANSWER_PREFIX.
SHORT_QUERY_TEMPLATE = "What is {query} in this image?"
SENTENCE_QUERY_TEMPLATE = "{query}"
ANSWER_PREFIX = "It is"

QueryMode = Literal["select_first", "all"]
QUERY_MODES: tuple[str, ...] = ("select_first", "all")
# PIL rasterises with 32-bit integer vertices; farther coordinates would wrap around silently.
_MAX_COORDINATE = 2**30


def reasoning_prompt(
    query: str,
    is_sentence: bool,
    short_template: str = SHORT_QUERY_TEMPLATE,
    sentence_template: str = SENTENCE_QUERY_TEMPLATE,
) -> str:
    """The user turn for ``query``: ``short_template`` for a phrase, ``sentence_template`` for a sentence.

    Each template holds ``{query}`` once; the query is stripped of surrounding white space.
    """
    template = sentence_template if is_sentence else short_template
    if template.count("{query}") != 1:
        raise ValueError(
            f"a reasoning prompt template must contain '{{query}}' exactly once, got {template!r}"
        )
    return template.replace("{query}", query.strip())


def is_sentence_query(query: str) -> bool:
    """Whether a query without the benchmark's ``is_sentence`` flag is a sentence: it ends in ".", "?" or
    "!"."""
    return query.strip()[-1:] in (".", "?", "!")


def polygon_mask(points: list[tuple[float, float]], width: int, height: int) -> np.ndarray:
    """bool ``[height, width]``: the pixels a polygon covers, its outline included.

    Vertex ``(x, y)`` names the pixel whose centre is column x, row y; fractional coordinates are truncated
    toward zero, as the benchmark's loader does (it casts to int32 before filling). Parts outside the image
    are clipped.
    """
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(int(x), int(y)) for x, y in points], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


@dataclass(frozen=True)
class _Shape:
    index: int  # in the JSON's "shapes"
    ignore: bool  # False: target
    points: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class _Annotation:
    queries: tuple[str, ...]
    is_sentence: bool
    shapes: tuple[_Shape, ...]  # "flag" shapes left out


@dataclass(frozen=True)
class _Item:
    sample_id: str
    stem: str
    query_index: int
    annotation: _Annotation | None
    # A problem found while indexing; under on_bad_sample="skip" it is reported when the item is read.
    problem: BadSampleError | None = None


def _parse_points(raw: Any, where: str) -> tuple[tuple[float, float], ...]:
    if not isinstance(raw, list) or len(raw) < 3:
        raise ValueError(f"{where}: 'points' must be a list of at least 3 [x, y] pairs, got {raw!r:.80}")
    points = []
    for point in raw:
        if not (
            isinstance(point, list)
            and len(point) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in point)
            and all(math.isfinite(v) and abs(v) <= _MAX_COORDINATE for v in point)
        ):
            raise ValueError(
                f"{where}: a point must be [x, y] with finite |x|, |y| <= 2^30, got {point!r:.80}"
            )
        points.append((float(point[0]), float(point[1])))
    return tuple(points)


def _parse_annotation(document: Any) -> _Annotation:
    """Checks a ReasonSeg JSON document; raises ``ValueError`` saying what is wrong."""
    if not isinstance(document, dict):
        raise ValueError(f"expected a JSON object, found a {type(document).__name__}")
    missing = [key for key in ("text", "is_sentence", "shapes") if key not in document]
    if missing:
        raise ValueError(f"missing keys {missing}")
    text = document["text"]
    queries = [text] if isinstance(text, str) else text
    if (
        not isinstance(queries, list)
        or not queries
        or not all(isinstance(q, str) and q.strip() for q in queries)
    ):
        raise ValueError(f"'text' must be a non-empty string or a list of them, got {text!r:.80}")
    is_sentence = document["is_sentence"]
    if not isinstance(is_sentence, bool):
        raise ValueError(f"'is_sentence' must be true or false, got {is_sentence!r}")
    if not isinstance(document["shapes"], list):
        raise ValueError(f"'shapes' must be a list, got {type(document['shapes']).__name__}")
    shapes = []
    for index, shape in enumerate(document["shapes"]):
        where = f"shapes[{index}]"
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
            raise ValueError(f"{where}: expected an object with a string 'label'")
        shape_type = shape.get("shape_type", "polygon")
        if shape_type != "polygon":
            raise ValueError(f"{where}: shape_type {shape_type!r} (only polygons are supported)")
        label = shape["label"].lower()
        if label == "flag":
            continue
        points = _parse_points(shape.get("points"), where)
        shapes.append(_Shape(index=index, ignore="ignore" in label, points=points))
    return _Annotation(tuple(q.strip() for q in queries), is_sentence, tuple(shapes))


def _read_json(path: Path) -> Any:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # Some files of the release are in Windows-1252 (the benchmark's own loader falls back to it too).
        text = raw.decode("cp1252")
    return json.loads(text)


class ReasonSegDataset(Dataset):
    """One split folder of ReasonSeg; each item one query, a ``GroundingSample`` (or a ``SkippedSample``).

    An item holds one object: ``phrases == [query]``, ``masks`` bool ``[1, H, W]`` (the target pixels),
    ``ignore_masks`` bool ``[1, H, W]`` (pixels left out of the metric; disjoint from the target),
    ``is_sentence`` bool ``[1]`` (long query). ``image_id`` is the file stem, ``object_ids == ["<stem>#<k>"]``
    for query k of the image.

    ``query_mode``: ``select_first`` evaluates the first query of each image (the benchmark's protocol);
    ``all`` makes one item per query, so an image with several queries counts once per query.
    ``max_queries``: only the first so many items (a quick look; None: all).

    Bad input (malformed JSON, an image without its JSON or the reverse, no target shape, a shape entirely
    outside the image, an unreadable image) raises ``BadSampleError`` naming the file, or is skipped under
    ``on_bad_sample="skip"``.
    """

    # How an evaluation split of this dataset is scored (reasoning segmentation: gIoU / cIoU per query).
    eval_kind = REASONING_KIND

    def __init__(
        self,
        split_dir: str | Path,
        query_mode: QueryMode = "select_first",
        on_bad_sample: OnBadSample = "raise",
        max_queries: int | None = None,
    ) -> None:
        if max_queries is not None and max_queries < 1:
            raise ValueError(f"max_queries must be at least 1 (or None: every query), got {max_queries}")
        if query_mode not in QUERY_MODES:
            raise ValueError(f"query_mode must be one of {QUERY_MODES}, got {query_mode!r}")
        self.on_bad_sample = check_on_bad_sample(on_bad_sample)
        self.split_dir = Path(split_dir)
        self.query_mode = query_mode
        self.name = f"reasonseg/{self.split_dir.name}"
        if not self.split_dir.is_dir():
            raise FileNotFoundError(f"ReasonSeg split folder not found: {self.split_dir}")
        stems = sorted(
            {path.stem for pattern in ("*.jpg", "*.json") for path in self.split_dir.glob(pattern)}
        )
        if not stems:
            raise ValueError(f"{self.split_dir}: no <name>.jpg / <name>.json pairs in this ReasonSeg split")
        self._items: list[_Item] = []
        for stem in stems:
            for item in self._index(stem):
                if item.problem is not None and self.on_bad_sample == "raise":
                    raise item.problem
                self._items.append(item)
        self._items = self._items[:max_queries]

    def _index(self, stem: str) -> list[_Item]:
        json_path = self.split_dir / f"{stem}.json"
        sample_id = f"name={stem}"
        if not json_path.is_file():
            error = BadSampleError(
                self.name,
                sample_id,
                str(json_path),
                BadSampleReason.MISSING_FILE,
                "annotation file not found",
            )
            return [_Item(sample_id, stem, 0, None, error)]
        try:
            annotation = _parse_annotation(_read_json(json_path))
        except (ValueError, RecursionError) as error:  # a JSONDecodeError, or JSON nested too deep
            problem = BadSampleError(
                self.name, sample_id, str(json_path), BadSampleReason.MALFORMED_ANNOTATION, str(error)
            )
            return [_Item(sample_id, stem, 0, None, problem)]
        if not any(not shape.ignore for shape in annotation.shapes):
            detail = "no target shape (every shape is labelled ignore or flag)"
            problem = BadSampleError(
                self.name, sample_id, str(json_path), BadSampleReason.MISSING_SEGMENT, detail
            )
            return [_Item(sample_id, stem, 0, None, problem)]
        count = 1 if self.query_mode == "select_first" else len(annotation.queries)
        return [_Item(f"name={stem}, query={k}", stem, k, annotation) for k in range(count)]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> GroundingSample | SkippedSample:
        return load_or_skip(self._load, self._items[index], self.on_bad_sample)

    def _load(self, item: _Item) -> GroundingSample:
        annotation = item.annotation
        assert annotation is not None  # every item indexed without a problem has one
        image = load_rgb_image(
            self.split_dir / f"{item.stem}.jpg", dataset=self.name, sample_id=item.sample_id
        )
        target, ignore = self._rasterise(item, annotation, image.width, image.height)
        return GroundingSample(
            image=image,
            phrases=[annotation.queries[item.query_index]],
            masks=torch.from_numpy(target[None]),
            is_thing=torch.ones(1, dtype=torch.bool),
            is_plural=torch.zeros(1, dtype=torch.bool),
            image_id=item.stem,
            file_name=f"{item.stem}.jpg",
            object_ids=[f"{item.stem}#{item.query_index}"],
            ignore_masks=torch.from_numpy(ignore[None]),
            is_sentence=torch.tensor([annotation.is_sentence]),
        )

    def _rasterise(
        self, item: _Item, annotation: _Annotation, width: int, height: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Target and ignore pixels, bool ``[H, W]`` each, disjoint."""
        json_path = str(self.split_dir / f"{item.stem}.json")
        masks = [polygon_mask(list(shape.points), width, height) for shape in annotation.shapes]
        areas = [int(mask.sum()) for mask in masks]
        for shape, area in zip(annotation.shapes, areas, strict=True):
            if area == 0:
                detail = f"shapes[{shape.index}] lies entirely outside the {width}x{height} (WxH) image"
                raise BadSampleError(self.name, item.sample_id, json_path, BadSampleReason.EMPTY_MASK, detail)
        labels = np.zeros((height, width), dtype=np.uint8)  # 0 none, 1 target, 2 ignore
        for k in sorted(range(len(masks)), key=lambda k: (areas[k], k), reverse=True):
            labels[masks[k]] = 2 if annotation.shapes[k].ignore else 1
        target, ignore = labels == 1, labels == 2
        if not target.any():
            detail = "the target shapes are entirely covered by ignore shapes"
            raise BadSampleError(self.name, item.sample_id, json_path, BadSampleReason.EMPTY_MASK, detail)
        return target, ignore
