"""Encoding samples for the model in dataloader workers, and collating them into one batch; reasoning
splits' samples are batched as they are (the inference pipeline encodes each query)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch.utils.data import ConcatDataset, Dataset

from flmm_lightning.boundaries import (
    FrozenFeatures,
    GroundingSample,
    LMMBatch,
    PromptBuilder,
    PromptInputs,
    SkippedSample,
)
from flmm_lightning.common.feature_store import FeatureStore, feature_key
from flmm_lightning.data.images import sam_input_image
from flmm_lightning.data.sampler import EpochIndex


@dataclass
class EncodedSample:
    """A sample with everything the model needs precomputed on the CPU side."""

    sample: GroundingSample
    prompt: PromptInputs
    sam_image: torch.Tensor  # uint8 [3, h, w], longest side resized to the SAM encoder's input size


@dataclass
class GroundingBatch:
    samples: list[GroundingSample]
    lmm: LMMBatch | None  # None when every item of the batch was skipped
    sam_images: list[torch.Tensor]  # uint8 [3, h_b, w_b]
    skipped: list[SkippedSample]
    # With a feature cache (``data.feature_cache``): each sample's ``common.feature_store.feature_key`` and
    # its cached frozen LMM features (None where the cache has none yet).
    feature_keys: list[str] | None = None
    cached_features: list[FrozenFeatures | None] | None = None

    def __len__(self) -> int:
        return len(self.samples)


@dataclass
class SampleBatch:
    """Samples as the dataset gives them, not encoded: a reasoning split's, whose prompts depend on the
    LMM's answers, so the inference pipeline encodes each query when it answers it."""

    samples: list[GroundingSample]
    skipped: list[SkippedSample]

    def __len__(self) -> int:
        return len(self.samples)


def collate_samples(items: Sequence[GroundingSample | SkippedSample]) -> SampleBatch:
    """Batches samples as they are; skipped samples ride along to be counted."""
    return SampleBatch(
        samples=[item for item in items if not isinstance(item, SkippedSample)],
        skipped=[item for item in items if isinstance(item, SkippedSample)],
    )


@runtime_checkable
class EpochAware(Protocol):
    """A dataset whose items depend on the epoch (e.g. RefCOCO's per-epoch random sentence)."""

    def set_epoch(self, epoch: int) -> None: ...


class EncodedDataset(Dataset):
    """Runs the LMM processor and SAM's resize on each item, so that this work happens in workers.

    ``fit_to_context=True`` (training) drops the trailing objects of a sample that does not fit the LMM's
    context (``PromptBuilder.fit_to_context``); otherwise such a sample raises ``ContextOverflowError``
    (evaluation, prediction: leaving objects out would change what is measured).
    """

    def __init__(
        self,
        dataset: Dataset | list,
        prompt_builder: PromptBuilder,
        sam_image_size: int,
        fit_to_context: bool = False,
    ) -> None:
        self.dataset = dataset
        self.prompt_builder = prompt_builder
        self.sam_image_size = sam_image_size
        self.fit_to_context = fit_to_context
        parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
        self._epoch_aware = [part for part in parts if isinstance(part, EpochAware)]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | EpochIndex) -> EncodedSample | SkippedSample:
        if isinstance(key, EpochIndex):
            # This worker's copies of the datasets learn the epoch from the index (``TrainingSampler``).
            for part in self._epoch_aware:
                part.set_epoch(key.epoch)
            key = key.index
        item = self.dataset[key]
        if isinstance(item, SkippedSample):
            return item
        return self.encode(item)

    def encode(self, item: GroundingSample) -> EncodedSample:
        if self.fit_to_context:
            item = self.prompt_builder.fit_to_context(item)
        return EncodedSample(
            sample=item,
            prompt=self.prompt_builder(item),
            sam_image=sam_input_image(item.image, self.sam_image_size),
        )


class GroundingCollate:
    """Collates encoded samples into one padded batch; skipped samples ride along to be counted. With a
    ``feature_store``, each sample's cache key and cached LMM features are looked up here, in the worker."""

    def __init__(self, prompt_builder: PromptBuilder, feature_store: FeatureStore | None = None) -> None:
        self.prompt_builder = prompt_builder
        self.feature_store = feature_store

    def __call__(self, items: Sequence[EncodedSample | SkippedSample]) -> GroundingBatch:
        encoded = [item for item in items if isinstance(item, EncodedSample)]
        skipped = [item for item in items if isinstance(item, SkippedSample)]
        if not encoded:
            return GroundingBatch(samples=[], lmm=None, sam_images=[], skipped=skipped)
        batch = GroundingBatch(
            samples=[item.sample for item in encoded],
            lmm=self.prompt_builder.collate([item.prompt for item in encoded]),
            sam_images=[item.sam_image for item in encoded],
            skipped=skipped,
        )
        if self.feature_store is not None:
            store = self.feature_store
            batch.feature_keys = [feature_key(store.identity, item.prompt) for item in encoded]
            batch.cached_features = [store.get(key) for key in batch.feature_keys]
        return batch
