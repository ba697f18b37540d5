"""Hydra/OmegaConf glue: where the configs live and the resolvers that build offline assets on demand."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def _conf_dir() -> Path:
    """An installed wheel's ``flmm_lightning/conf``, else the ``conf/`` at the top of the source tree (an
    editable install, or ``PYTHONPATH=src``)."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return installed if installed.is_dir() else package.parents[1] / "conf"


CONF_DIR = _conf_dir()


def _asset(name: str, cache_dir: str) -> str:
    from flmm_lightning import assets

    return str(assets.ensure_asset(name, cache_dir=cache_dir))


def _synthetic(root: str, num_train: int = 240, num_val: int = 60) -> str:
    from flmm_lightning.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(root, num_train=int(num_train), num_val=int(num_val))
    return str(Path(root).resolve())


def register_resolvers() -> None:
    """``${flmm_asset:<name>,<cache_dir>}`` builds a tiny offline model when missing and returns its path;
    ``${flmm_synthetic:<root>[,num_train,num_val]}`` writes the synthetic dataset when missing and returns
    its root."""
    OmegaConf.register_new_resolver("flmm_asset", _asset, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("flmm_synthetic", _synthetic, replace=True, use_cache=True)
