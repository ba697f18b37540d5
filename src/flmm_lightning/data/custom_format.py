"""The simple grounding format: one JSON Lines file (or one JSON array) per split, one record per image.

A record (docs/own-data.md has a complete example)::

    {"id": "kitchen-1", "image": "photos/kitchen-1.jpg", "width": 640, "height": 480,
     "objects": [{"id": "cup", "phrases": ["the red cup", "cup on the left"],
                  "mask": [[x0, y0, x1, y1, ...]], "box": [x, y, w, h]}]}

``mask`` is a COCO segmentation: polygons (a list of flat ``[x0, y0, x1, y1, ...]`` lists, pixel
coordinates) or an RLE ``{"size": [height, width], "counts": ...}``. A narrative record has a ``caption``
and, instead of ``phrases``, each object names its words with a character ``span: [start, end)`` of the
caption; the rest of the caption is ungrounded text (scored like Panoptic Narrative Grounding, and it
trains the keyword selector). ``id``, ``width``, ``height``, ``box``, ``is_thing`` (default true),
``plural`` (default false) and ``category`` are optional; any other key is an error, so that a misspelled
field is never silently ignored.

This module reads and checks the structure of a file (nothing is decoded); ``check_pixels`` reads a
record's image and decodes its masks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from flmm_lightning.data.bad_samples import BadSampleError
from flmm_lightning.data.images import load_rgb_image
from flmm_lightning.data.refcoco import decode_segmentation

RECORD_KEYS = ("id", "image", "width", "height", "objects", "caption")
OBJECT_KEYS = ("id", "phrases", "span", "mask", "box", "is_thing", "plural", "category")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a file: where (file, line, field) and what."""

    path: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.message}"


class FormatError(ValueError):
    """A file that cannot be read as the simple format at all (not JSON Lines, not a JSON array)."""


@dataclass(frozen=True)
class ObjectRecord:
    id: str
    phrases: tuple[str, ...]  # a narrative object: its span's text
    mask: list | dict  # COCO segmentation
    box: tuple[float, float, float, float] | None  # [x, y, w, h]
    span: tuple[int, int] | None
    is_thing: bool
    plural: bool


@dataclass(frozen=True)
class ImageRecord:
    line: int
    id: str
    image: str
    size: tuple[int, int] | None  # (width, height) when the record gives it
    objects: tuple[ObjectRecord, ...]
    caption: str | None

    @property
    def narrative(self) -> bool:
        return self.caption is not None


def _raw_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, parsed value) of each record: a JSON array's elements or a JSON Lines file's lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise FormatError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    start = len(text) - len(text.lstrip())
    if text[start : start + 1] == "[":
        decoder = json.JSONDecoder()
        position = start + 1
        while True:
            while position < len(text) and text[position] in " \t\r\n,":
                position += 1
            if position >= len(text):
                raise FormatError(f"{path}: the JSON array is not closed")
            if text[position] == "]":
                return
            line = text.count("\n", 0, position) + 1
            try:
                value, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError as error:
                raise FormatError(f"{path}:{error.lineno}: not valid JSON: {error.msg}") from None
            except RecursionError:
                raise FormatError(f"{path}:{line}: refused: nested deeper than the parser follows") from None
            yield line, value
    for number, content in enumerate(text.splitlines(), start=1):
        if not content.strip():
            continue
        try:
            yield number, json.loads(content)
        except json.JSONDecodeError as error:
            raise FormatError(
                f"{path}:{number}: not valid JSON ({error.msg}); each line holds one record"
            ) from None
        except RecursionError:
            raise FormatError(f"{path}:{number}: refused: nested deeper than the parser follows") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))


class _RecordParser:
    """Checks one raw record's structure, collecting every problem rather than stopping at the first."""

    def __init__(self, path: str, line: int) -> None:
        self.path = path
        self.line = line
        self.problems: list[Problem] = []

    def problem(self, field: str, message: str) -> None:
        self.problems.append(Problem(self.path, self.line, field, message))

    def parse(self, raw: Any) -> ImageRecord | None:
        if not isinstance(raw, dict):
            self.problem("record", f"must be an object, found {type(raw).__name__}")
            return None
        for key in raw:
            if key not in RECORD_KEYS:
                self.problem(str(key), f"unknown field (a record has: {', '.join(RECORD_KEYS)})")
        image = raw.get("image")
        if not isinstance(image, str) or not image.strip():
            self.problem("image", "must be a non-empty path")
        record_id = raw.get("id", image)
        if not isinstance(record_id, str | int) or isinstance(record_id, bool) or str(record_id) == "":
            self.problem("id", "must be a non-empty string or an integer")
        size = self._size(raw)
        caption = raw.get("caption")
        if caption is not None and (not isinstance(caption, str) or not caption.strip()):
            self.problem("caption", "must be a non-empty string")
            caption = None
        objects = raw.get("objects")
        if not isinstance(objects, list) or not objects:
            self.problem("objects", "must be a non-empty list (a record grounds at least one object)")
            objects = []
        parsed = [
            self._object(f"objects[{k}]", raw_object, k, caption) for k, raw_object in enumerate(objects)
        ]
        self._check_ids_and_spans(parsed)
        if self.problems:
            return None
        return ImageRecord(
            self.line, str(record_id), image, size, tuple(p for p in parsed if p is not None), caption
        )

    def _size(self, raw: dict) -> tuple[int, int] | None:
        if "width" not in raw and "height" not in raw:
            return None
        width, height = raw.get("width"), raw.get("height")
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                self.problem(
                    name, f"must be a positive integer (give both width and height or neither), got {value!r}"
                )
                return None
        return width, height

    def _object(self, field: str, raw: Any, index: int, caption: str | None) -> ObjectRecord | None:
        if not isinstance(raw, dict):
            self.problem(field, f"must be an object, found {type(raw).__name__}")
            return None
        before = len(self.problems)
        for key in raw:
            if key not in OBJECT_KEYS:
                self.problem(f"{field}.{key}", f"unknown field (an object has: {', '.join(OBJECT_KEYS)})")
        object_id = raw.get("id", index)
        if not isinstance(object_id, str | int) or isinstance(object_id, bool) or str(object_id) == "":
            self.problem(f"{field}.id", "must be a non-empty string or an integer")
        span = None
        if caption is None:
            if "span" in raw:
                self.problem(f"{field}.span", "a span needs the record's caption")
            phrases = self._phrases(f"{field}.phrases", raw.get("phrases"))
        else:
            span = self._span(f"{field}.span", raw.get("span"), caption)
            phrases = (caption[span[0] : span[1]],) if span else ()
            given = raw.get("phrases")
            if given is not None and list(given) != list(phrases):
                self.problem(f"{field}.phrases", f"{given!r} differs from the span's text {list(phrases)!r}")
        self._mask(f"{field}.mask", raw.get("mask"))
        box = raw.get("box")
        if box is not None and not (
            isinstance(box, list)
            and len(box) == 4
            and all(map(_is_number, box))
            and box[2] > 0
            and box[3] > 0
        ):
            self.problem(f"{field}.box", f"must be [x, y, width, height] with width, height > 0, got {box!r}")
        flags = {}
        for name, default in (("is_thing", True), ("plural", False)):
            flags[name] = raw.get(name, default)
            if not isinstance(flags[name], bool):
                self.problem(f"{field}.{name}", f"must be true or false, got {flags[name]!r}")
        if len(self.problems) > before:
            return None
        return ObjectRecord(
            str(object_id),
            phrases,
            raw["mask"],
            tuple(box) if box is not None else None,
            span,
            flags["is_thing"],
            flags["plural"],
        )

    def _phrases(self, field: str, phrases: Any) -> tuple[str, ...]:
        if not isinstance(phrases, list) or not phrases:
            self.problem(field, "must be a non-empty list of phrases")
            return ()
        for k, phrase in enumerate(phrases):
            if not isinstance(phrase, str) or not phrase.strip():
                self.problem(f"{field}[{k}]", f"must be a non-empty string, got {phrase!r}")
        return tuple(phrases)

    def _span(self, field: str, span: Any, caption: str) -> tuple[int, int] | None:
        valid = (
            isinstance(span, list)
            and len(span) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
            and 0 <= span[0] < span[1] <= len(caption)
        )
        if not valid:
            self.problem(
                field, f"must be [start, end) with 0 <= start < end <= {len(caption)} (the caption's length)"
            )
            return None
        start, end = span
        if not caption[start:end].strip():
            self.problem(field, f"{span} covers only whitespace of the caption")
            return None
        cuts_start = start > 0 and caption[start - 1].isalnum() and caption[start].isalnum()
        cuts_end = end < len(caption) and caption[end - 1].isalnum() and caption[end].isalnum()
        if cuts_start or cuts_end:
            self.problem(
                field, f"{span} cuts a word: {caption[start:end]!r} (spans are [start, end), from 0)"
            )
            return None
        return span[0], span[1]

    def _mask(self, field: str, mask: Any) -> None:
        if isinstance(mask, dict):
            size, counts = mask.get("size"), mask.get("counts")
            if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
                self.problem(f"{field}.size", f"an RLE needs size [height, width], got {size!r}")
            if not isinstance(counts, str | list) or not counts:
                self.problem(f"{field}.counts", "an RLE needs counts (a string or a list of run lengths)")
            return
        if not isinstance(mask, list) or not mask:
            self.problem(field, "must be polygons [[x0, y0, x1, y1, ...], ...] or an RLE {size, counts}")
            return
        for k, polygon in enumerate(mask):
            if not (isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0):
                self.problem(f"{field}[{k}]", "a polygon is a flat list of at least 3 (x, y) points")
            elif not all(map(_is_number, polygon)):
                self.problem(f"{field}[{k}]", "polygon coordinates must be finite numbers")

    def _check_ids_and_spans(self, objects: list[ObjectRecord | None]) -> None:
        seen: dict[str, int] = {}
        spans: list[tuple[int, int, int]] = []
        for k, obj in enumerate(objects):
            if obj is None:
                continue
            if obj.id in seen:
                self.problem(f"objects[{k}].id", f"{obj.id!r} is also the id of objects[{seen[obj.id]}]")
            seen.setdefault(obj.id, k)
            if obj.span is not None:
                spans.append((*obj.span, k))
        spans.sort()
        for (_, end, k), (start, _, j) in zip(spans, spans[1:], strict=False):
            if start < end:
                self.problem(f"objects[{j}].span", f"overlaps the span of objects[{k}]")


def read_records(path: str | Path) -> tuple[list[ImageRecord], list[Problem]]:
    """The well-formed records of ``path`` and the problems of the others (each naming file, line and
    field). Raises ``FormatError`` when the file is not JSON Lines or a JSON array at all."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: file not found")
    records: list[ImageRecord] = []
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    for line, raw in _raw_records(path):
        parser = _RecordParser(str(path), line)
        record = parser.parse(raw)
        problems.extend(parser.problems)
        if record is None:
            continue
        if record.id in first_line:
            problems.append(
                Problem(
                    str(path),
                    line,
                    "id",
                    f"{record.id!r} is also the id of the record on line {first_line[record.id]}",
                )
            )
            continue
        first_line[record.id] = line
        records.append(record)
    return records, problems


def image_path(record: ImageRecord, image_root: Path) -> Path:
    """Where a record's image is: its path, relative ones under ``image_root``."""
    return image_root / record.image


def _polygon_outside(polygons: list, width: int, height: int) -> str | None:
    for k, polygon in enumerate(polygons):
        xs, ys = np.asarray(polygon[0::2], dtype=float), np.asarray(polygon[1::2], dtype=float)
        if xs.min() < 0 or ys.min() < 0 or xs.max() > width or ys.max() > height:
            reach = f"x {xs.min():g}..{xs.max():g}, y {ys.min():g}..{ys.max():g}"
            return f"polygon {k} reaches {reach}, outside the {width}x{height} (WxH) image"
    return None


def decode_object_mask(obj: ObjectRecord, width: int, height: int) -> tuple[np.ndarray | None, str | None]:
    """(bool ``[height, width]`` mask, None), or (None, what is wrong): an RLE of another size, a polygon
    outside the image, a mask with no pixel, a box outside the image."""
    if isinstance(obj.mask, list):
        outside = _polygon_outside(obj.mask, width, height)
        if outside:
            return None, outside
    try:
        mask = decode_segmentation(obj.mask, height, width).astype(bool)
    except (ValueError, TypeError) as error:
        return None, f"cannot decode: {error}"
    if not mask.any():
        return None, "decodes to an empty mask"
    if obj.box is not None:
        x, y, w, h = obj.box
        if x < 0 or y < 0 or x + w > width or y + h > height:
            return None, f"box {list(obj.box)} reaches outside the {width}x{height} (WxH) image"
    return mask, None


@dataclass
class CheckedRecord:
    """A record whose image was read and masks decoded: its masks, or the problems found."""

    record: ImageRecord
    image_size: tuple[int, int] | None  # (width, height)
    masks: list[np.ndarray]
    problems: list[Problem]


def check_pixels(record: ImageRecord, image_root: Path, path: str, dataset: str) -> CheckedRecord:
    """Reads the record's image and decodes every mask: the image readable (and of the record's size),
    every mask decodable, inside the image and not empty, no two objects with the same phrases and mask."""
    problems: list[Problem] = []

    def problem(field: str, message: str) -> None:
        problems.append(Problem(path, record.line, field, message))

    try:
        image = load_rgb_image(
            image_path(record, image_root),
            dataset=dataset,
            sample_id=f"line {record.line}",
            expected_wh=record.size,
        )
    except BadSampleError as error:
        problem("image", f"{error.reason}: {error.detail} ({error.path})")
        return CheckedRecord(record, None, [], problems)
    width, height = image.size
    masks: list[np.ndarray | None] = []
    for k, obj in enumerate(record.objects):
        mask, message = decode_object_mask(obj, width, height)
        masks.append(mask)
        if mask is None:
            problem(f"objects[{k}].{'box' if message.startswith('box') else 'mask'}", str(message))
            continue
        for j, earlier in enumerate(record.objects[:k]):
            if earlier.phrases == obj.phrases and masks[j] is not None and np.array_equal(masks[j], mask):
                problem(f"objects[{k}]", f"duplicate of objects[{j}] (same phrases, same mask)")
    decoded = [mask for mask in masks if mask is not None]
    return CheckedRecord(record, (width, height), decoded if not problems else [], problems)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A bool ``[H, W]`` mask as a compressed COCO RLE with a string ``counts`` (JSON-safe)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def write_records(records: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Writes records as JSON Lines; returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count
