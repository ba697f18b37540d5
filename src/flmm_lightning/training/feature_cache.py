"""Turning the frozen LMM's feature cache on for a run (``data.feature_cache=<folder>``): opening the store
for the built model and datamodule, and the callback that writes the queued entries out as shards.

The store itself, its format and its keys: ``feature_store``. The pre-pass and the sizing command:
``python -m flmm_lightning.cache``.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning import Callback, LightningModule, Trainer

from flmm_lightning.common.feature_store import FeatureStore
from flmm_lightning.data.datamodule import GroundingDataModule
from flmm_lightning.training.module import FLMMModule

logger = logging.getLogger(__name__)


def check_cacheable(datamodule: GroundingDataModule) -> None:
    """Refuses a training set whose text changes every epoch in a way the cache cannot serve.

    ``random_per_epoch`` draws a new sentence per ref and epoch. The key holds the text, so an ungrouped set
    (one ref per sample) is cached per sentence and served once each sentence has been drawn; a set grouped
    by image (all refs of an image in one sequence) draws a new combination of sentences every epoch, which
    would almost never be served again while the cache kept growing."""
    for name, dataset in datamodule.train_sets.items():
        if getattr(dataset, "text_mode", None) == "random_per_epoch" and getattr(
            dataset, "group_by_image", False
        ):
            raise ValueError(
                f"data.train_sets.{name}: text_mode=random_per_epoch with group_by_image=true draws a new "
                "combination of sentences for every image and epoch, so the feature cache "
                "(data.feature_cache) would store each and almost never serve one. Use text_mode=random_once "
                "(the reference's: one sentence per ref, drawn once), group_by_image=false (cached per "
                "sentence), or data.feature_cache=null."
            )


def open_feature_cache(
    module: FLMMModule, datamodule: GroundingDataModule, precision: Any
) -> FeatureStore | None:
    """The store of ``datamodule.feature_cache`` (None when off) for ``module``'s LMM under the trainer's
    ``precision`` (autocast changes the features), attached to the model core and the datamodule's loaders."""
    if not datamodule.feature_cache:
        return None
    check_cacheable(datamodule)
    identity = f"{module.model.lmm.feature_identity()}|precision={precision}"
    store = FeatureStore(datamodule.feature_cache, identity)
    module.model.feature_store = store
    datamodule.use_feature_store(store)
    logger.info("feature cache: %s (%d entries)", store.directory, len(store))
    return store


class FeatureCacheWriter(Callback):
    """Writes the entries queued during a loop as a shard when the loop's epoch ends (before the next epoch's
    workers look them up) and when the run ends; reports what the cache served."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store

    def _flush(self, trainer: Trainer, stage: str) -> None:
        self.store.flush()
        stats = self.store.stats
        if trainer.is_global_zero and stats.served + stats.computed:
            logger.info(
                "feature cache after %s: %d samples served, %d computed, %d entries written",
                stage,
                stats.served,
                stats.computed,
                stats.writes,
            )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, f"training epoch {trainer.current_epoch}")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, "validation")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, "test")

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, "the fill")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.store.flush()
