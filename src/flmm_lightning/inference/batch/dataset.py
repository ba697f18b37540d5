"""The inputs of a batch prediction as a Lightning data module: images decoded and encoded in worker
processes, batched through evaluation's collate (images of a batch need not share a size), sharded so that
every pending input goes to exactly one rank."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from lightning import LightningDataModule
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from flmm_lightning.boundaries import GroundingSample, PromptBuilder
from flmm_lightning.data.batch import EncodedDataset, EncodedSample, GroundingBatch, GroundingCollate
from flmm_lightning.data.images import ImageLimits, load_photo
from flmm_lightning.data.sampler import UnpaddedDistributedSampler
from flmm_lightning.data.workers import dataloader_worker_init
from flmm_lightning.inference.batch.manifest import ManifestEntry
from flmm_lightning.inference.batch.output import PredictionOutput


@dataclass
class PredictionItem:
    """One input, ready to run or failed: exactly one of ``encoded``, ``photo`` and ``error`` is set."""

    entry: ManifestEntry
    encoded: EncodedSample | None = None  # phrases to ground: encoded for the batched forward
    photo: Image.Image | None = None  # a query: the LMM answers it first, one input at a time
    error: str | None = None


@dataclass
class PredictionBatch:
    """A batch of inputs: those with phrases as one ``GroundingBatch``, the queries and the failed ones."""

    grounded: list[ManifestEntry]  # in the order of ``grounding.samples``
    grounding: GroundingBatch
    queries: list[tuple[ManifestEntry, Image.Image]]
    failed: list[tuple[ManifestEntry, str]]

    def __len__(self) -> int:
        return len(self.grounded) + len(self.queries) + len(self.failed)


class PredictionDataset(Dataset):
    """Reads each input's image (as viewers show it) and encodes it as the evaluation does; a missing,
    unreadable or truncated image, or phrases that do not fit the LMM's context, make an item with the
    reason instead of stopping the run."""

    def __init__(
        self,
        entries: Sequence[ManifestEntry],
        prompt_builder: PromptBuilder,
        sam_image_size: int,
        image_limits: ImageLimits | None = None,
    ):
        self.entries = list(entries)
        self.image_limits = image_limits
        self.encoder = EncodedDataset([], prompt_builder, sam_image_size)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> PredictionItem:
        entry = self.entries[index]
        if entry.error is not None:
            return PredictionItem(entry, error=entry.error)
        try:
            photo = load_photo(entry.image, self.image_limits)
            if entry.query is not None:
                return PredictionItem(entry, photo=photo)
            sample = GroundingSample.for_inference(
                photo, list(entry.phrases or ()), image_id=entry.id, file_name=entry.image
            )
            return PredictionItem(entry, encoded=self.encoder.encode(sample))
        # Whatever one input's file or text does wrong (PIL's decoding errors are OSErrors and ValueErrors,
        # a context overflow a ValueError), it is that input's error line.
        except (OSError, ValueError) as error:
            return PredictionItem(entry, error=f"{type(error).__name__}: {error}")


class PredictionCollate:
    """Evaluation's ``GroundingCollate`` over the inputs with phrases; queries and failures ride along."""

    def __init__(self, prompt_builder: PromptBuilder) -> None:
        self.grounding = GroundingCollate(prompt_builder)

    def __call__(self, items: Sequence[PredictionItem]) -> PredictionBatch:
        encoded = [item for item in items if item.encoded is not None]
        return PredictionBatch(
            grounded=[item.entry for item in encoded],
            grounding=self.grounding([item.encoded for item in encoded]),
            queries=[(item.entry, item.photo) for item in items if item.photo is not None],
            failed=[(item.entry, item.error) for item in items if item.error is not None],
        )


class BatchPredictionData(LightningDataModule):
    """The inputs not yet in ``output``: found in ``setup`` on every rank, after global rank 0 has folded
    a previous run's shards into the output, so that every rank shards the same list."""

    def __init__(
        self,
        entries: Sequence[ManifestEntry],
        output: PredictionOutput,
        prompt_builder: PromptBuilder,
        sam_image_size: int,
        batch_size: int = 8,
        num_workers: int = 2,
        image_limits: ImageLimits | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch.size must be at least 1, got {batch_size}")
        self.entries = list(entries)
        self.output = output
        self.prompt_builder = prompt_builder
        self.sam_image_size = sam_image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_limits = image_limits
        self.pending: list[ManifestEntry] = []
        self.shard_size = 0  # the inputs this rank predicts (set with its dataloader)

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.is_global_zero:
            self.output.consolidate()
        if self.trainer is not None:
            self.trainer.strategy.barrier("batch_predict.setup")
        done = self.output.completed_ids()
        self.pending = [entry for entry in self.entries if entry.id not in done]
        # The LMM's processor loads lazily (seconds: its vocabulary); loaded here, before the dataloader forks
        # its workers, they inherit it instead of each loading its own at the first image.
        getattr(self.prompt_builder, "processor", None)

    def transfer_batch_to_device(
        self, batch: PredictionBatch, device: torch.device, dataloader_idx: int
    ) -> PredictionBatch:
        # Only the model's inputs move; the photos of the queries stay PIL images.
        batch.grounding = move_data_to_device(batch.grounding, device)
        return batch

    def predict_dataloader(self) -> DataLoader:
        dataset = PredictionDataset(self.pending, self.prompt_builder, self.sam_image_size, self.image_limits)
        sampler = (
            UnpaddedDistributedSampler(dataset) if dist.is_available() and dist.is_initialized() else None
        )
        self.shard_size = len(dataset) if sampler is None else len(sampler)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=PredictionCollate(self.prompt_builder),
            worker_init_fn=dataloader_worker_init,
        )
