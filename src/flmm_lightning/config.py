"""Hydra/OmegaConf glue: where the configs live and the resolvers that build offline assets on demand."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _asset(name: str, cache_dir: str) -> str:
    from flmm_lightning import assets

    return str(assets.ensure_asset(name, cache_dir=cache_dir))


def _synthetic(root: str, num_train: int = 240, num_val: int = 60) -> str:
    from flmm_lightning.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(root, num_train=int(num_train), num_val=int(num_val))
    return str(Path(root).resolve())


def _run_dir(ckpt_path: str | None, fresh: str) -> str:
    from flmm_lightning.run_dirs import run_dir

    return run_dir(ckpt_path, fresh)


def register_resolvers() -> None:
    """``${flmm_asset:<name>,<cache_dir>}`` builds a tiny offline model when missing and returns its path;
    ``${flmm_synthetic:<root>[,num_train,num_val]}`` writes the synthetic dataset when missing and returns
    its root; ``${flmm_cwd:}`` is the working directory (``hydra:runtime.cwd`` is the same with
    ``hydra.job.chdir=false``, but a multirun launcher resolves ``hydra.sweep.dir`` before Hydra's own
    resolver works); ``${flmm_run_dir:<ckpt_path>,<fresh>}`` is the run folder of a resumed checkpoint,
    else ``fresh``."""
    OmegaConf.register_new_resolver("flmm_cwd", os.getcwd, replace=True)
    OmegaConf.register_new_resolver("flmm_asset", _asset, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("flmm_synthetic", _synthetic, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("flmm_run_dir", _run_dir, replace=True)
