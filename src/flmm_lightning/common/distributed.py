"""Gathering Python objects from every rank."""

from __future__ import annotations

from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def all_gather_objects(value: T) -> list[T]:
    """``value`` of every rank, in rank order; just ``[value]`` outside a process group of several ranks.

    A collective under a process group: every rank must call it at the same point.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered: list[T] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, value)
    return gathered
