"""The overlays people look at: mask colours that stay with their objects, and heat-map colours."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from flmm_lightning.outputs.overlays import HEAT_COLORS, object_color, overlay_heatmap, overlay_masks


def test_a_shown_subset_of_masks_keeps_each_ones_colour() -> None:
    image = Image.new("RGB", (160, 120), (0, 0, 0))  # room for the legend at the bottom left
    masks = torch.zeros(1, 120, 160, dtype=torch.bool)
    masks[0, 10:20, 10:30] = True
    drawn = np.asarray(overlay_masks(image, masks, ["third"], alpha=1.0, color_indices=[2]))
    assert tuple(drawn[15, 20]) == object_color(2) and tuple(drawn[25, 35]) == (0, 0, 0)


def test_the_heatmap_runs_from_its_coldest_to_its_hottest_colour() -> None:
    heat = np.array([[0.0, 1.0, 0.5]], dtype=np.float32)
    drawn = np.asarray(overlay_heatmap(Image.new("RGB", (3, 1)), heat, alpha=1.0)).astype(np.float32)
    assert np.array_equal(drawn[0, 0], HEAT_COLORS[0]) and np.array_equal(drawn[0, 1], HEAT_COLORS[-1])
    middle = (HEAT_COLORS[1] + HEAT_COLORS[2]) / 2  # 0.5 lies halfway between the two middle colours
    assert np.abs(drawn[0, 2] - middle).max() <= 0.5
