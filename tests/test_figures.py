"""``make figures`` (scripts/figures.py): the documentation's pictures come from a checkpoint, a run's
overlays and the browser test's screenshots, each a small PNG, and a missing input is named."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.outputs.overlays import overlay_masks, side_by_side

REPO = Path(__file__).resolve().parents[1]


def load_figures_script():
    spec = importlib.util.spec_from_file_location("figures", REPO / "scripts" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


figures = load_figures_script()


def write_overlays(run_dir: Path, splits: dict[str, int], size: int = 96) -> None:
    """Overlays as a run writes them: prediction | ground truth, side by side."""
    image = Image.new("RGB", (size, size), (120, 120, 120))
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, 20:60, 30:70] = True
    for split, count in splits.items():
        (run_dir / "overlays" / split).mkdir(parents=True)
        for k in range(count):
            overlay = overlay_masks(image, mask, ["a square"])
            side_by_side(overlay, overlay).save(run_dir / "overlays" / split / f"{k}_pred_vs_gt.png")


def test_the_pipeline_figure_is_drawn_from_the_checkpoint_as_a_small_picture(
    tiny_checkpoint: Path, synthetic_data, tmp_path: Path
) -> None:
    grounder = Grounder.from_checkpoint(tiny_checkpoint, device="cpu")
    path = figures.pipeline_figure(grounder, synthetic_data.root, tmp_path, candidates=2)
    assert path == tmp_path / "pipeline.png"
    assert path.stat().st_size < figures.MAX_BYTES
    with Image.open(path) as picture:
        assert picture.mode == "P"  # palette: what keeps it small
        assert picture.width > 3 * picture.height  # the five stages side by side


def test_the_examples_figure_has_a_row_per_split_of_the_runs_own_overlays(tmp_path: Path) -> None:
    write_overlays(tmp_path / "run", {"synthetic_png_val": 4, "synthetic_refcoco_val": 2})
    path = figures.examples_figure(tmp_path / "run", tmp_path / "assets", per_split=3)
    with Image.open(path) as picture:
        assert picture.width <= figures.PAGE_WIDTH
        pixels = np.asarray(picture.convert("RGB"))
    # each row is a caption (mostly white) above the overlays: two bands of tiles separated by white
    tile_rows = (pixels.min(axis=2) > 245).mean(axis=1) < 0.6
    starts = np.flatnonzero(tile_rows[1:] & ~tile_rows[:-1])  # where a band begins
    assert len(starts) == 2


def test_a_run_without_overlays_is_named(tmp_path: Path) -> None:
    (tmp_path / "run" / "overlays").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="run"):
        figures.examples_figure(tmp_path / "run", tmp_path / "assets")


def test_missing_screenshots_name_the_browser_test_that_makes_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tests/test_app.py"):
        figures.screenshot_figures(tmp_path / "screens", tmp_path / "assets")


def test_a_picture_of_a_megabyte_or_more_is_refused_and_not_left_behind(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (1600, 1600, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="noise.png"):
        figures.save_small(Image.fromarray(noise), tmp_path / "noise.png")
    assert not (tmp_path / "noise.png").exists()
