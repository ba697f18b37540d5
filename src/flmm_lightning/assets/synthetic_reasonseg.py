"""The synthetic images' ReasonSeg split: labelme-style JSONs whose queries name a shape only through a
property of it (its kind's geometry, or a thing of its colour)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from flmm_lightning.assets.synthetic_shapes import SyntheticShape

# ReasonSeg queries name a shape only through a property of it. Per kind: (short phrases, sentences).
_KIND_QUERIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "circle": (
        ("the round shape", "the shape with no corners"),
        ("Which shape in this picture has no corners at all?", "Which shape here could roll like a wheel?"),
    ),
    "square": (
        ("the shape with four equal sides", "the shape with four right angles"),
        ("Which shape in this picture has four equal sides?", "Which shape here has four right angles?"),
    ),
    "triangle": (
        ("the shape with three corners", "the three-sided shape"),
        ("Which shape in this picture has exactly three corners?", "Which shape here has only three sides?"),
    ),
}
# Per colour, a thing of that colour.
COLOUR_THINGS: dict[str, str] = {
    "red": "a ripe tomato",
    "green": "fresh grass",
    "blue": "a clear summer sky",
    "yellow": "a lemon",
    "purple": "a violet",
    "orange": "a carrot",
}
_COLOUR_QUERIES: tuple[tuple[str, ...], tuple[str, ...]] = (
    ("the shape the colour of {thing}", "the shape coloured like {thing}"),
    ("Which shape in this picture has the colour of {thing}?", "Which shape here is coloured like {thing}?"),
)
_CIRCLE_VERTICES = 32
_IGNORE_PROBABILITY = 0.3


def _polygon(shape: SyntheticShape) -> list[list[float]]:
    """The shape's outline as labelme points ``[[x, y], ...]`` (a circle as a regular 32-gon)."""
    r = shape.radius
    if shape.kind == "circle":
        angles = [2 * math.pi * k / _CIRCLE_VERTICES for k in range(_CIRCLE_VERTICES)]
        points = [(shape.cx + r * math.cos(a), shape.cy + r * math.sin(a)) for a in angles]
    elif shape.kind == "square":
        points = [(shape.cx - r, shape.cy - r), (shape.cx + r, shape.cy - r)]
        points += [(shape.cx + r, shape.cy + r), (shape.cx - r, shape.cy + r)]
    else:
        points = [(shape.cx, shape.cy - r), (shape.cx + r, shape.cy + r), (shape.cx - r, shape.cy + r)]
    return [[round(x, 2), round(y, 2)] for x, y in points]


def _labelme_shape(label: str, shape: SyntheticShape) -> dict[str, Any]:
    return {"label": label, "points": _polygon(shape), "group_id": None, "shape_type": "polygon", "flags": {}}


def _reasonseg_queries(
    rng: np.random.Generator, target: SyntheticShape, shapes: list[SyntheticShape]
) -> tuple[list[str], bool]:
    """One or two phrasings of a query for ``target`` alone, and whether they are sentences. The kind is a
    property only when no other shape shares it; the colour always is (one colour per shape and image)."""
    unique_kind = sum(shape.kind == target.kind for shape in shapes) == 1
    is_sentence = bool(rng.random() < 0.5)
    if unique_kind and rng.random() < 0.5:
        phrasings = list(_KIND_QUERIES[target.kind][int(is_sentence)])
    else:
        thing = COLOUR_THINGS[target.colour]
        phrasings = [template.format(thing=thing) for template in _COLOUR_QUERIES[int(is_sentence)]]
    count = int(rng.integers(1, len(phrasings) + 1))
    return [phrasings[int(k)] for k in rng.permutation(len(phrasings))[:count]], is_sentence


def write_reasonseg(
    rng: np.random.Generator, split_dir: Path, image_path: Path, shapes: list[SyntheticShape]
) -> None:
    """``<stem>.jpg`` (the image, hard-linked where the file system allows) and ``<stem>.json``: queries for
    one target shape; sometimes another shape is marked ``ignore``."""
    target_index = int(rng.integers(len(shapes)))
    queries, is_sentence = _reasonseg_queries(rng, shapes[target_index], shapes)
    labelled = [_labelme_shape("target", shapes[target_index])]
    others = [shape for k, shape in enumerate(shapes) if k != target_index]
    if others and rng.random() < _IGNORE_PROBABILITY:
        labelled.append(_labelme_shape("ignore", others[int(rng.integers(len(others)))]))
    document = {"text": queries, "is_sentence": is_sentence, "shapes": labelled}
    link = split_dir / image_path.name
    try:
        os.link(image_path, link)
    except OSError:
        shutil.copyfile(image_path, link)
    link.with_suffix(".json").write_text(json.dumps(document))
