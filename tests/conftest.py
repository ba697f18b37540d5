"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from flmm_lightning.data.synthetic import SyntheticPaths, write_synthetic_dataset

# ---- data fixtures ---------------------------------------------------------------------------------------
# The real annotation fixtures (read-only; copy before modifying). FLMM_FIXTURES_DIR overrides the location.
_FIXTURE_CANDIDATES = (Path(__file__).parent / "fixtures", Path("/work/shared/fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    override = os.environ.get("FLMM_FIXTURES_DIR")
    candidates = (Path(override),) if override else _FIXTURE_CANDIDATES
    for candidate in candidates:
        if (candidate / "coco_sample").is_dir():
            return candidate
    raise FileNotFoundError(f"test fixtures not found in {candidates}; set FLMM_FIXTURES_DIR")


@pytest.fixture
def coco_sample(fixtures_dir: Path, tmp_path: Path) -> Path:
    """A private, writable copy of fixtures/coco_sample."""
    return Path(shutil.copytree(fixtures_dir / "coco_sample", tmp_path / "coco_sample"))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPaths:
    """A small synthetic dataset in the real RefCOCO / PNG formats, written once per session."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=12, num_val=6)
