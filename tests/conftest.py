"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from flmm_lightning.data.synthetic import SyntheticPaths, write_synthetic_dataset


def intra_op_threads() -> int:
    """Intra-op threads for the tests that pin them (training runs): FLMM_TEST_THREADS, default 1."""
    return int(os.environ.get("FLMM_TEST_THREADS", "1"))


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


# ---- model fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def compose_config():
    """Composes a config the way ``python -m flmm_lightning.train`` does (Hydra context included)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from flmm_lightning.config import CONF_DIR, register_resolvers

    register_resolvers()

    def _compose(overrides: list[str], config_name: str = "train"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg

    return _compose


@pytest.fixture(scope="session")
def tiny_config(compose_config, tmp_path_factory: pytest.TempPathFactory):
    """The demo experiment on a small synthetic dataset (12 train / 6 val images) in a temporary folder."""
    return compose_config(tiny_overrides(tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("run")))


def tiny_overrides(data_dir: Path, run_dir: Path) -> list[str]:
    return [
        "+experiment=demo",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}",
        "data.synthetic.num_train=12",
        "data.synthetic.num_val=6",
        "data.num_workers=0",
        "logger=csv",
    ]
