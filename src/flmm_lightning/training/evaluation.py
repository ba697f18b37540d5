"""What every evaluating LightningModule shares: one ``SplitMetrics`` per split of the datamodule, the step
output that callbacks read (overlays, the per-object table), and the figures of each split computed, logged
and kept as ``last_results`` at the end of a loop. ``training.module.FLMMModule`` scores grounding splits
with it, ``training.reasoning_eval.ReasoningEvaluator`` reasoning splits."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from lightning import LightningModule
from torch import nn

from flmm_lightning.data.batch import GroundingBatch, SampleBatch
from flmm_lightning.metrics import SplitMetrics


@dataclass
class EvalStepOutput:
    """What a validation/test step hands to callbacks (overlays, per-object tables)."""

    batch: GroundingBatch | SampleBatch
    pred_masks: list[torch.Tensor]  # bool [n, H, W] per sample: the fine (SAM) masks
    ious: list[torch.Tensor]  # float64 [n] per sample: mask IoU of the fine masks
    coarse_masks: list[torch.Tensor]  # bool [n, H, W] per sample: the U-Net's masks at the image's size
    coarse_ious: list[torch.Tensor]  # float64 [n] per sample


# The datamodule's splits that each Lightning stage evaluates.
_STAGE_SPLITS = {"fit": "val_names", "validate": "val_names", "test": "test_names"}


class SplitEvaluation(LightningModule, ABC):
    """A LightningModule that scores the datamodule's evaluation splits, one ``SplitMetrics`` each (made by
    ``split_metrics`` from the ``eval_kind`` the split's dataset declares), each batch in ``evaluate``."""

    def __init__(self) -> None:
        super().__init__()
        self.eval_metrics = nn.ModuleDict()
        # The figures of the last validation or test loop, by split (``training.callbacks.MetricsJsonWriter``)
        self.last_results: dict[str, dict[str, float]] = {}
        self._split_names: dict[str, list[str]] = {"validate": [], "test": []}

    @abstractmethod
    def split_metrics(self, name: str, kind: str) -> SplitMetrics:
        """The metrics of split ``name``, scored as ``kind``; raises where this module cannot score it."""

    @abstractmethod
    def evaluate(self, batch: GroundingBatch | SampleBatch, metrics: SplitMetrics) -> EvalStepOutput:
        """Updates ``metrics`` with the batch's masks and returns them for the callbacks."""

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or stage not in _STAGE_SPLITS:
            return
        for name in getattr(datamodule, _STAGE_SPLITS[stage]):
            if name not in self.eval_metrics:
                self.eval_metrics[name] = self.split_metrics(name, datamodule.split_kind(name))
        self._split_names = {"validate": datamodule.val_names, "test": datamodule.test_names}

    def _eval_step(
        self, batch: GroundingBatch | SampleBatch, dataloader_idx: int, stage: str
    ) -> EvalStepOutput:
        if not batch.samples:
            return EvalStepOutput(batch, [], [], [], [])
        return self.evaluate(batch, self.eval_metrics[self._split_names[stage][dataloader_idx]])

    def validation_step(
        self, batch: GroundingBatch | SampleBatch, batch_idx: int, dataloader_idx: int = 0
    ) -> EvalStepOutput:
        return self._eval_step(batch, dataloader_idx, "validate")

    def test_step(
        self, batch: GroundingBatch | SampleBatch, batch_idx: int, dataloader_idx: int = 0
    ) -> EvalStepOutput:
        return self._eval_step(batch, dataloader_idx, "test")

    def split_results(self, stage: str) -> dict[str, dict[str, float]]:
        """Computes (synchronised across ranks) and resets the metrics of every split of ``stage``."""
        results: dict[str, dict[str, float]] = {}
        for split in self._split_names[stage]:
            metrics = self.eval_metrics[split]
            results[split] = {name: float(value) for name, value in metrics.compute().items()}
            metrics.reset()
        return results

    def _log_split_results(self, stage: str) -> None:
        results = self.split_results(stage)
        self.last_results = results
        flat = {
            f"{split}/{name}": value for split, values in results.items() for name, value in values.items()
        }
        self.log_dict(
            {k: v for k, v in flat.items() if not math.isnan(v)}, sync_dist=False, rank_zero_only=True
        )

    def on_validation_epoch_end(self) -> None:
        self._log_split_results("validate")

    def on_test_epoch_end(self) -> None:
        self._log_split_results("test")
