"""Samplers: evaluation shards without padding; a training order that a resumed run reproduces."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler


def replicas_and_rank(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """The given replica count and rank, each defaulting to the initialised process group (else 1 and 0)."""
    distributed = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if distributed else 1
    if rank is None:
        rank = dist.get_rank() if distributed else 0
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"Invalid rank {rank} for {num_replicas} replicas")
    return num_replicas, rank


class UnpaddedDistributedSampler(Sampler[int]):
    """Rank ``r`` of ``R`` gets indices ``r, r + R, r + 2R, ...``, in order.

    ``torch.utils.data.DistributedSampler`` repeats samples so that every rank gets the same count, which
    would count those objects twice in a distributed evaluation; here every sample is seen exactly once and
    rank sizes differ by at most one. Use it with ``Trainer(use_distributed_sampler=False)``. The metrics
    do no collective during ``update``, so uneven shard sizes are safe as long as the validation step does
    none either (no ``self.log(..., sync_dist=True)`` per step; under ``fit`` a DDP-wrapped model with
    buffers broadcasts them on every forward unless the strategy sets ``broadcast_buffers=False``).

    ``num_replicas`` and ``rank`` default to the initialised process group, or to a single process.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__()
        self.dataset = dataset
        self.num_replicas, self.rank = replicas_and_rank(num_replicas, rank)

    def _indices(self) -> range:
        return range(self.rank, len(self.dataset), self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


class EpochIndex(NamedTuple):
    """A dataset index with the epoch it is read in (what ``TrainingSampler`` yields)."""

    epoch: int
    index: int


class TrainingSampler(Sampler[EpochIndex]):
    """Training order: a permutation drawn from ``seed + epoch`` alone, split across DDP ranks.

    ``RandomSampler`` draws its order from the global torch RNG, which a resumed run does not get back, so a
    resumed run would see other batches than an uninterrupted one; here the order of an epoch is the same in
    both. Lightning calls ``set_epoch`` at the start of every epoch. Rank ``r`` of ``R`` gets every R-th index
    of the permutation, which is wrapped around to a multiple of ``R`` (as ``DistributedSampler`` does) so
    that all ranks take the same number of steps.

    The items are ``EpochIndex(epoch, index)``: a dataset with per-epoch randomness (RefCOCO
    ``text_mode="random_per_epoch"``) reads the epoch from the index, in whichever worker loads the item,
    since workers hold their own copies of the dataset.
    """

    def __init__(
        self,
        length: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        self.num_replicas, self.rank = replicas_and_rank(num_replicas, rank)
        if length < 1:
            raise ValueError("the training set is empty")
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, num_items: int) -> None:
        """The next iteration starts after its first ``num_items`` items (resuming within an epoch)."""
        self._skip = num_items

    def __len__(self) -> int:
        return math.ceil(self.length / self.num_replicas)

    def __iter__(self) -> Iterator[EpochIndex]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        total = len(self) * self.num_replicas
        order = (order * math.ceil(total / self.length))[:total]
        shard = order[self.rank : total : self.num_replicas]
        skip, self._skip = self._skip, 0
        for index in shard[skip:]:
            yield EpochIndex(self.epoch, index)


class ResumableDataLoader(DataLoader):
    """A training DataLoader whose position in the epoch rides in Lightning's checkpoints.

    Lightning saves ``state_dict()`` of every dataloader that has one and hands it back to
    ``load_state_dict`` on resume; a run resumed from a mid-epoch checkpoint then goes on with the first batch
    it had not trained on. A plain DataLoader would restart the epoch from its first batch, training twice on
    what it had already seen. The sampler must be a ``TrainingSampler``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, TrainingSampler):
            raise TypeError(f"ResumableDataLoader needs a TrainingSampler, got {type(self.sampler).__name__}")
        self._batches_done = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained on in that epoch)

    def __iter__(self) -> Iterator[Any]:
        # A generator: this runs at the first ``next``, after Lightning's ``set_epoch`` for the epoch.
        self._batches_done = 0
        if self._resume is not None:
            epoch, batches_done = self._resume
            self._resume = None
            # A checkpoint written after an epoch's last batch resumes with the next epoch: no skipping then.
            if epoch == self.sampler.epoch:
                self._batches_done = batches_done
                self.sampler.skip_next(batches_done * self.batch_size)
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_done": self._batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches_done"]))
