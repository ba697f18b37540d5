"""Shared pytest fixtures, and the environment every test runs in."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from flmm_lightning.assets.synthetic_data import SyntheticPaths

# The small real-data fixtures, inside the repository (tests/fixtures/README.md: origin and licence of each).
FIXTURES_DIR = Path(__file__).parent / "fixtures"
# The temporary folder that stands in for the user's caches during a session.
_TEMP_HOME = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    """Runs before any test module is imported (this file imports no project code at module level), so before
    anything imports transformers: nothing reaches the network, and the tiny assets, the default data folder,
    the Hugging Face, W&B and other XDG caches go to one temporary folder, removed at the end, instead of the
    user's home and working tree."""
    home = Path(tempfile.mkdtemp(prefix="flmm_tests_"))
    config.stash[_TEMP_HOME] = home
    os.environ.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="offline",
        FLMM_CACHE_DIR=str(home / "flmm_assets"),
        # the default data folder of every config: a checkpoint's stored ``${paths.data_dir}/synthetic`` is
        # written there, never into the working tree's data/ (a developer's demo data)
        FLMM_DATA_DIR=str(home / "data"),
        HF_HOME=str(home / "huggingface"),
        XDG_CACHE_HOME=str(home / "cache"),
        WANDB_CACHE_DIR=str(home / "wandb_cache"),
        WANDB_CONFIG_DIR=str(home / "wandb_config"),
        WANDB_DATA_DIR=str(home / "wandb_data"),
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    home = config.stash.get(_TEMP_HOME, None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


def intra_op_threads() -> int:
    """Intra-op threads for the tests that pin them (training runs): FLMM_TEST_THREADS, default 1."""
    return int(os.environ.get("FLMM_TEST_THREADS", "1"))


@pytest.fixture(scope="module")
def pinned_threads() -> Iterator[None]:
    """``intra_op_threads()`` for the tests of a module that marks itself with
    ``pytestmark = pytest.mark.usefixtures("pinned_threads")``: on a small machine shared with other jobs, two
    spinning OpenMP threads made a CPU step several times slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(intra_op_threads())
    yield
    torch.set_num_threads(threads)


# ---- data fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The real annotation fixtures (read-only; ``coco_sample`` gives a writable copy)."""
    return FIXTURES_DIR


@pytest.fixture
def coco_sample(fixtures_dir: Path, tmp_path: Path) -> Path:
    """A private, writable copy of fixtures/coco_sample."""
    return Path(shutil.copytree(fixtures_dir / "coco_sample", tmp_path / "coco_sample"))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> SyntheticPaths:
    """A small synthetic dataset in the real RefCOCO / PNG formats, written once per session."""
    from flmm_lightning.assets.synthetic_data import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_train=12, num_val=6)


# ---- model fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def compose_config():
    """Composes a config the way ``python -m flmm_lightning.train`` does (Hydra context included)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from flmm_lightning.config.composition import CONF_DIR, register_resolvers

    register_resolvers()

    def _compose(overrides: list[str], config_name: str = "train"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg

    return _compose


@pytest.fixture(scope="session")
def tiny_qwen_dir() -> Path:
    """The tiny Qwen2.5-VL checkpoint folder (``flmm_lightning.assets`` builds it offline, once)."""
    from flmm_lightning.assets import ensure_tiny_qwen2_5_vl

    return ensure_tiny_qwen2_5_vl()


@pytest.fixture(scope="session")
def tiny_config(compose_config, tmp_path_factory: pytest.TempPathFactory):
    """The demo experiment on a small synthetic dataset (12 train / 6 val images) in a temporary folder."""
    return compose_config(tiny_overrides(tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("run")))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained model of the demo experiment (tiny Qwen2.5-VL with its keyword selector, tiny SAM), saved
    the way training saves it: its trainable weights and its config. Shared by the session: read it, never
    change it."""
    import torch

    from flmm_lightning.runs.build import build_module, run_config

    torch.manual_seed(0)
    module = build_module(tiny_config)
    path = tmp_path_factory.mktemp("tiny_checkpoint") / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "flmm_config": run_config(tiny_config)}, path)
    return path


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
