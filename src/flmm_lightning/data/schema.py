"""The schema of a ``conf/data`` yaml: every key it may set, with its type.

``builders.build_datamodule`` checks a data config against it, so that a misspelled key
(``data.eval_batch_sise``) is an error naming it instead of a setting silently left at its default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    train_sets: dict[str, Any] | None = None
    val_sets: dict[str, Any] | None = None
    test_sets: dict[str, Any] | None = None
    synthetic: SyntheticSettings | None = None
    custom: CustomSettings | None = None
