"""The schema of a ``conf/data`` yaml: every key it may set, with its type.

``check_data_config`` (called by ``runs.build.build_datamodule``) checks a data config against it, so that a
misspelled key (``data.eval_batch_sise``) is an error naming it instead of a setting silently left at its
default.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from flmm_lightning.config.errors import ConfigError

# The keys of ``DataConfig`` that are not ``GroundingDataModule`` arguments: only other values read them.
INTERPOLATION_HELPERS = ("synthetic", "custom")
DATASET_GROUPS = ("train_sets", "val_sets", "test_sets")


@dataclass
class SyntheticSettings:
    """``data/synthetic*.yaml``'s generator settings, read by ``${flmm_synthetic:...}`` and the set paths."""

    num_train: int = 240
    num_val: int = 60
    root: str = ""


@dataclass
class CustomSettings:
    """``data/custom.yaml``'s files in the simple format (docs/own-data.md), read by its set nodes."""

    train: str | None = None
    val: str | None = None
    test: str | None = None
    image_root: str | None = None
    on_bad_sample: str = "raise"
    check_images: bool = True


@dataclass
class DataConfig:
    """A data config: ``GroundingDataModule``'s settings (``prompt_builder`` and ``sam_image_size`` come from
    the model), its dataset nodes by split name (each a ``_target_`` with its arguments), and the
    interpolation helpers (``INTERPOLATION_HELPERS``)."""

    _target_: str = "flmm_lightning.data.datamodule.GroundingDataModule"
    batch_size: int = 1
    eval_batch_size: int | None = None
    num_workers: int = 2
    pin_memory: bool = False
    seed: int = 0
    feature_cache: str | None = None
    train_sets: dict[str, Any] | None = None
    val_sets: dict[str, Any] | None = None
    test_sets: dict[str, Any] | None = None
    synthetic: SyntheticSettings | None = None
    custom: CustomSettings | None = None


def check_data_config(data_cfg: DictConfig) -> None:
    """Raises ``ConfigError`` naming a key of ``data_cfg`` that ``data.schema.DataConfig`` does not declare
    (a misspelling) or a value of the wrong type."""
    schema = OmegaConf.structured(DataConfig)
    try:
        # Resolving builds nothing (``prepare_inputs`` does); the dataset nodes' own keys are theirs to check.
        OmegaConf.merge(schema, OmegaConf.to_container(data_cfg, resolve=True))
    except OmegaConfBaseException as error:
        key = f"data.{error.full_key}" if error.full_key else "data"
        if isinstance(error, ConfigKeyError) and is_dataclass(error.object_type):
            known = ", ".join(field.name for field in fields(error.object_type))
            raise ConfigError(
                f"{key} is not a key of a data config (known there: {known}; "
                "see flmm_lightning.config.data_schema)"
            ) from None
        raise ConfigError(f"{key}: {str(error).splitlines()[0]}") from None
