"""The LightningDataModule: concatenated training sets, named evaluation splits."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch.distributed as dist
from lightning import LightningDataModule
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from flmm_lightning.boundaries import PromptBuilder
from flmm_lightning.common.feature_store import FeatureStore
from flmm_lightning.data.batch import EncodedDataset, GroundingCollate, collate_samples
from flmm_lightning.data.reasonseg import REASONING_KIND
from flmm_lightning.data.sampler import ResumableDataLoader, TrainingSampler, UnpaddedDistributedSampler
from flmm_lightning.data.workers import dataloader_worker_init

# Hydra's override grammar allows no "+" in a key: the RefCOCO+ splits are configured as ``refcocop_*`` (so
# that ``data.test_sets.refcocop_val.<setting>=`` works on the command line) and reported under RefCOCO+'s
# own name: tables, metrics.json, W&B panels and the per-object CSV say ``refcoco+_val``.
_KEY_SPELLINGS = {"refcocop_": "refcoco+_"}


def split_name(key: str) -> str:
    """The name a split is reported under, from its config key (``refcocop_val`` -> ``refcoco+_val``)."""
    for spelling, name in _KEY_SPELLINGS.items():
        if key.startswith(spelling):
            return name + key[len(spelling) :]
    return key


def is_reasoning_set(dataset: Dataset | None) -> bool:
    """Whether ``dataset`` declares itself a reasoning split (``eval_kind``)."""
    return getattr(dataset, "eval_kind", None) == REASONING_KIND


class GroundingDataModule(LightningDataModule):
    """``train`` is the concatenation of ``train_sets``; ``val``/``test`` have one dataloader per named split.

    Split names (``refcoco_val``, ``png_val``, ...: ``split_name`` of the config keys) are reused as metric
    prefixes. Samplers are built here
    (the Trainer runs with ``use_distributed_sampler=False``): under DDP the evaluation sampler gives every
    sample to exactly one rank, without the padding Lightning's default sampler adds, so a distributed
    evaluation measures the same objects as a single process.
    """

    def __init__(
        self,
        prompt_builder: PromptBuilder,
        sam_image_size: int,
        train_sets: Mapping[str, Dataset] | None = None,
        val_sets: Mapping[str, Dataset] | None = None,
        test_sets: Mapping[str, Dataset] | None = None,
        batch_size: int = 1,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        seed: int = 0,
        feature_cache: str | None = None,
    ) -> None:
        """``feature_cache``: the folder of the frozen LMM's feature cache (``feature_store``; off when
        None); the entry points open it with ``use_feature_store`` once the LMM is built."""
        super().__init__()
        self.prompt_builder = prompt_builder
        self.sam_image_size = sam_image_size
        self.train_sets = dict(train_sets or {})
        self.val_sets = {split_name(key): dataset for key, dataset in (val_sets or {}).items()}
        self.test_sets = {split_name(key): dataset for key, dataset in (test_sets or {}).items()}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.feature_cache = feature_cache
        self.collate = GroundingCollate(prompt_builder)

    def use_feature_store(self, store: FeatureStore | None) -> None:
        """Every dataloader made from now on looks its samples up in ``store`` (in its workers)."""
        self.collate = GroundingCollate(self.prompt_builder, store)

    @property
    def val_names(self) -> list[str]:
        return list(self.val_sets)

    @property
    def test_names(self) -> list[str]:
        return list(self.test_sets)

    def _split_dataset(self, name: str) -> Dataset | None:
        # by key: an empty dataset is falsy
        return self.val_sets[name] if name in self.val_sets else self.test_sets.get(name)

    def split_kind(self, name: str) -> str:
        """How split ``name`` is scored: the ``eval_kind`` its dataset declares (``"res"`` referring,
        ``"png"`` narratives, ``"reasonseg"`` reasoning segmentation)."""
        dataset = self._split_dataset(name)
        kind = getattr(dataset, "eval_kind", None)
        if kind is None:
            raise TypeError(
                f"evaluation split {name}: {type(dataset).__name__} declares no eval_kind (how to score it)"
            )
        return kind

    def is_reasoning(self, name: str) -> bool:
        """Whether split ``name`` is a reasoning split: its loader gives the samples unencoded, and a
        reasoning evaluator (``training.reasoning_eval``) scores it."""
        return is_reasoning_set(self._split_dataset(name))

    def with_test_sets(self, names: Iterable[str]) -> GroundingDataModule:
        """This datamodule with only the test splits ``names`` (the same dataset objects): one test loop per
        evaluating module where a config mixes reasoning splits with the others."""
        subset = copy.copy(self)
        subset.test_sets = {name: self.test_sets[name] for name in names}
        return subset

    def _encoded(self, dataset: Dataset, fit_to_context: bool = False) -> EncodedDataset:
        return EncodedDataset(dataset, self.prompt_builder, self.sam_image_size, fit_to_context)

    def encoded_sets(self) -> dict[str, EncodedDataset]:
        """Every configured set by split name that its loader encodes, encoded as it does (training sets
        fitted to the LMM's context): what a feature-cache pre-pass walks (``python -m flmm_lightning.cache
        fill``). Reasoning splits are left out: their loaders do not encode them."""
        sets = {
            name: self._encoded(dataset, fit_to_context=True) for name, dataset in self.train_sets.items()
        }
        for name, dataset in {**self.val_sets, **self.test_sets}.items():
            if not is_reasoning_set(dataset):
                sets.setdefault(name, self._encoded(dataset))
        return sets

    def _loader_settings(self, collate: Callable[..., Any]) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "collate_fn": collate,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
            "worker_init_fn": dataloader_worker_init,
        }

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled by ``(seed, epoch)`` and resumable mid-epoch, so that a resumed run trains on exactly the
        batches an uninterrupted one would; samples too long for the LMM lose their trailing objects."""
        if not self.train_sets:
            raise ValueError("no training dataset configured (data.train_sets is empty)")
        dataset = self._encoded(ConcatDataset(list(self.train_sets.values())), fit_to_context=True)
        sampler = TrainingSampler(len(dataset), seed=self.seed)
        return ResumableDataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, **self._loader_settings(self.collate)
        )

    def _eval_loaders(self, sets: Mapping[str, Dataset]) -> list[DataLoader]:
        """One loader per split: encoded samples in a ``GroundingBatch``, or for a reasoning split the
        samples as they are in a ``SampleBatch`` (each query's prompt holds the LMM's answer, so the
        inference pipeline encodes it; encoding the grounding prompt and SAM's input here would be waste)."""
        loaders = []
        for dataset in sets.values():
            if is_reasoning_set(dataset):
                items, collate = dataset, collate_samples
            else:
                items, collate = self._encoded(dataset), self.collate
            sampler = None
            if dist.is_available() and dist.is_initialized():
                sampler = UnpaddedDistributedSampler(items)
            loaders.append(
                DataLoader(
                    items, batch_size=self.eval_batch_size, sampler=sampler, **self._loader_settings(collate)
                )
            )
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.val_sets)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.test_sets)
