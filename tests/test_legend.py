"""The overlay's legend fits the image whatever the number of phrases: inside it, out of the top band where
Gradio draws the "Masks" badge, entries not overlapping, every object's number shown."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flmm_lightning.outputs.overlays import LEGEND_FREE_TOP, legend_layout, overlay_masks

PHOTO = "coco_sample/images/000000142238.jpg"  # 640x427


def overlaps(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize(
    ("count", "label", "size"),
    [
        (3, "the man in the white shirt", (640, 427)),
        (30, "a person", (640, 427)),
        (40, "the tall man in the white shirt holding a racket", (640, 427)),
        (60, "the ball", (320, 240)),
    ],
)
def test_every_entry_is_inside_the_image_below_the_badge_band_and_apart(
    count: int, label: str, size: tuple[int, int]
) -> None:
    layout = legend_layout([(k, f"{label} {k}") for k in range(count)], size)
    width, height = size
    assert [entry.index for entry in layout] == list(range(count))
    for k, entry in enumerate(layout):
        x0, y0, x1, y1 = entry.box
        assert 0 <= x0 and x1 <= width and y1 <= height, (entry.text, entry.box)
        assert y0 >= math.floor(height * LEGEND_FREE_TOP), (entry.text, entry.box)
        assert entry.text.split(" ")[0] == str(k + 1)
        assert entry.text in (f"{k + 1} {label} {k}", str(k + 1)) or entry.text.endswith("…")
    assert all(not overlaps(a.box, b.box) for i, a in enumerate(layout) for b in layout[i + 1 :])


def test_a_short_legend_keeps_its_full_labels() -> None:
    layout = legend_layout([(k, f"object {k}") for k in range(3)], (640, 427))
    assert [entry.text for entry in layout] == [f"{k + 1} object {k}" for k in range(3)]


def test_the_drawn_legend_stays_in_its_entries_boxes(fixtures_dir: Path) -> None:
    """Drawn on the photo with no mask: every changed pixel lies in an entry's box, none in the top band."""
    with Image.open(fixtures_dir / PHOTO) as photo:
        image = photo.convert("RGB")
    labels = [f"the person number {k} on the court" for k in range(35)]
    masks = torch.zeros(len(labels), image.height, image.width, dtype=torch.bool)
    drawn = np.asarray(overlay_masks(image, masks, labels))
    changed = (drawn != np.asarray(image)).any(-1)
    covered = np.zeros_like(changed)
    for entry in legend_layout(list(enumerate(labels)), image.size):
        x0, y0, x1, y1 = entry.box
        covered[max(0, y0) : y1 + 1, max(0, x0) : x1 + 1] = True
    assert changed.any() and not (changed & ~covered).any()
    assert not changed[: math.floor(image.height * LEGEND_FREE_TOP)].any()
