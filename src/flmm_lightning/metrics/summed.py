"""The state every metric of this room keeps: a few tensors of sums, reduced across DDP ranks by summation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric


class SummedMetric(Metric):
    """A metric whose state is sums only, so that it is exact across DDP ranks whatever the sharding.

    A subclass declares its states in ``sum_states`` (name -> (shape, dtype), zeros at the start), in the
    order in which its functional ``_*_update`` returns a batch's statistics; ``update`` hands those to
    ``add``, ``compute`` reads them back from ``sums()`` in the same order.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    sum_states: ClassVar[dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, (shape, dtype) in self.sum_states.items():
            self.add_state(name, torch.zeros(shape, dtype=dtype), dist_reduce_fx="sum")

    def add(self, statistics: Sequence[Tensor]) -> None:
        """Adds one batch's statistics to the states, in ``sum_states`` order."""
        for name, value in zip(self.sum_states, statistics, strict=True):
            state = getattr(self, name)
            state += value.to(state.device)

    def sums(self) -> tuple[Tensor, ...]:
        """The states, in ``sum_states`` order."""
        return tuple(getattr(self, name) for name in self.sum_states)
