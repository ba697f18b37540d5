"""Evaluation sampler that shards a dataset across DDP ranks without padding it."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch.distributed as dist
from torch.utils.data import Sampler


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
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"Invalid rank {rank} for {num_replicas} replicas")
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank

    def _indices(self) -> range:
        return range(self.rank, len(self.dataset), self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())
