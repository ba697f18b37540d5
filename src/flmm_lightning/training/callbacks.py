"""Callbacks: mask overlays (files and W&B panels), the per-object table of an evaluation, the run's
hyper-parameters for every logger, a progress bar that reads right when training by steps, and the report of
the data a run could not use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from flmm_lightning.boundaries import GroundingSample
from flmm_lightning.common.distributed import all_gather_objects
from flmm_lightning.data.bad_samples import BadSampleSummary
from flmm_lightning.metrics.functional import mask_box_iou
from flmm_lightning.outputs.overlays import label_map, overlay_masks, pad_to, side_by_side
from flmm_lightning.outputs.reporting import write_metrics_json, write_per_object_csv
from flmm_lightning.training.evaluation import EvalStepOutput
from flmm_lightning.training.reliability import COUNTERS_KEY, FinalCheckpoint, NonFiniteLossGuard


def _split_name(trainer: Trainer, dataloader_idx: int) -> str:
    names = trainer.datamodule.test_names if trainer.testing else trainer.datamodule.val_names
    return names[dataloader_idx]


class MaskOverlayCallback(Callback):
    """Keeps the first ``num_images`` samples of every evaluation split (a fixed set, so that a person sees
    the same images sharpen over training). At the end of validation they go to W&B as image panels with
    prediction and ground-truth masks; at the end of testing they are written as PNGs
    (prediction | ground truth) under ``out_dir/<split>/``."""

    def __init__(self, out_dir: str, num_images: int = 4) -> None:
        self.out_dir = Path(out_dir)
        self.num_images = num_images
        self._kept: dict[str, list[tuple[GroundingSample, Any]]] = {}

    def _keep(self, trainer: Trainer, outputs: EvalStepOutput, dataloader_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        kept = self._kept.setdefault(_split_name(trainer, dataloader_idx), [])
        for sample, pred in zip(outputs.batch.samples, outputs.pred_masks, strict=True):
            if len(kept) < self.num_images:
                kept.append((sample, pred.cpu()))

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._keep(trainer, outputs, dataloader_idx)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._keep(trainer, outputs, dataloader_idx)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if loggers and trainer.is_global_zero:
            import wandb

            for split, kept in self._kept.items():
                # W&B shows a panel's images at one size: smaller ones are padded (masks with background).
                size = (max(s.image.width for s, _ in kept), max(s.image.height for s, _ in kept))
                images = []
                for sample, pred in kept:
                    class_labels = {k + 1: phrase for k, phrase in enumerate(sample.phrases)}
                    images.append(
                        wandb.Image(
                            pad_to(sample.image, size),
                            caption=" | ".join(sample.phrases),
                            masks={
                                "prediction": {
                                    "mask_data": _pad_labels(label_map(pred), size),
                                    "class_labels": class_labels,
                                },
                                "ground_truth": {
                                    "mask_data": _pad_labels(label_map(sample.masks), size),
                                    "class_labels": class_labels,
                                },
                            },
                        )
                    )
                for logger in loggers:
                    logger.experiment.log(
                        {f"{split}/overlays": images, "trainer/global_step": trainer.global_step}
                    )
        self._kept.clear()

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            for split, kept in self._kept.items():
                folder = self.out_dir / split
                folder.mkdir(parents=True, exist_ok=True)
                for sample, pred in kept:
                    figure = side_by_side(
                        overlay_masks(sample.image, pred, sample.phrases),
                        overlay_masks(sample.image, sample.masks, sample.phrases),
                    )
                    figure.save(folder / f"{sample.image_id}_pred_vs_gt.png")
        self._kept.clear()


def _pad_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label map padded at the right and bottom to ``size`` (width, height) with background (0)."""
    width, height = size
    return np.pad(labels, ((0, height - labels.shape[0]), (0, width - labels.shape[1])))


class StoredConfigWriter(Callback):
    """Puts the run's model-defining config (``runs.build.run_config``: plain, checked data) into every
    checkpoint as ``flmm_config``, so that eval, predict and ``Grounder`` rebuild the same model from
    ``ckpt=`` alone."""

    def __init__(self, stored: dict[str, Any]) -> None:
        self.stored = stored

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["flmm_config"] = self.stored


class HyperparameterLogger(Callback):
    """Gives every logger the run's resolved config (model, SAM, data, optimizer, trainer, ...), so that the
    runs of a sweep can be told apart: W&B shows it as the run config, the CSV logger writes
    ``hparams.yaml``. Logged from the process that runs the loop (``ddp_spawn`` workers included)."""

    def __init__(self, hyperparameters: dict[str, Any]) -> None:
        self.hyperparameters = hyperparameters

    @classmethod
    def from_config(
        cls, cfg: DictConfig, stored: DictConfig | dict[str, Any] | None = None
    ) -> HyperparameterLogger:
        """The resolved ``cfg`` (Hydra's own section left out) merged over ``stored``, the config a checkpoint
        carries (model, SAM, module, data): a key ``cfg`` sets wins, the rest of a stored section stays."""
        merged = OmegaConf.merge(stored or {}, {key: cfg[key] for key in cfg if key != "hydra"})
        return cls(
            {
                key: value
                for key, value in OmegaConf.to_container(merged, resolve=True).items()
                if value is not None
            }
        )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_hyperparams(self.hyperparameters)


class StepAwareProgressBar(RichProgressBar):
    """Lightning's rich bar labels the epoch ``Epoch 0/-2`` when training by steps (``max_epochs: -1``): this
    one names the step budget instead of a last epoch."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        if trainer.max_steps >= 0:
            description += f" · max_steps {trainer.max_steps}"
        return f"{description:{len(self.validation_description)}}"


class PerObjectRecorder(Callback):
    """Collects one row per evaluated object (image, phrase; mask IoU and box IoU of the fine masks and of the
    coarse ones) to find failures.

    At the end of testing the rows of every rank are gathered (under DDP each rank saw a shard, rank ``r`` of
    ``R`` the samples ``r, r + R, ...``; they are put back in dataset order) and, when ``path`` is given,
    global rank 0 writes them as CSV. Writing here, in the process that ran the test loop, is what makes the
    file complete under ``ddp_spawn`` too, where the loop runs in worker processes.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.rows: list[dict[str, object]] = []
        # split -> rows of each sample, in the order this rank saw the samples
        self._per_sample: dict[str, list[list[dict[str, object]]]] = {}

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows = []
        self._per_sample = {}

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        split = _split_name(trainer, dataloader_idx)
        samples = self._per_sample.setdefault(split, [])
        per_sample = zip(
            outputs.batch.samples,
            outputs.pred_masks,
            outputs.ious,
            outputs.coarse_masks,
            outputs.coarse_ious,
            strict=True,
        )
        for sample, pred, ious, coarse, coarse_ious in per_sample:
            gt = sample.masks.to(pred.device)
            box_ious = mask_box_iou(pred, gt)
            coarse_box_ious = mask_box_iou(coarse, gt)
            samples.append(
                [
                    {
                        "split": split,
                        "image_id": sample.image_id,
                        "file_name": sample.file_name,
                        "object_id": sample.object_ids[k],
                        "phrase": sample.phrases[k],
                        "iou": round(float(ious[k]), 6),
                        "box_iou": round(float(box_ious[k]), 6),
                        "coarse_iou": round(float(coarse_ious[k]), 6),
                        "coarse_box_iou": round(float(coarse_box_ious[k]), 6),
                    }
                    for k in range(sample.num_objects)
                ]
            )

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        per_rank = all_gather_objects(self._per_sample)
        rows: list[dict[str, object]] = []
        for split in trainer.datamodule.test_names:
            shards = [shard.get(split, []) for shard in per_rank]
            for position in range(max((len(shard) for shard in shards), default=0)):
                for shard in shards:
                    if position < len(shard):
                        rows.extend(shard[position])
        self.rows = rows
        if self.path is not None and trainer.is_global_zero:
            write_per_object_csv(rows, self.path)


class MetricsJsonWriter(Callback):
    """Writes the test metrics of every split (the module's ``last_results``) to ``path`` on global rank 0 at
    the end of testing: from the process that computed them, so that they reach the caller under
    ``ddp_spawn`` as well (read them back with ``outputs.reporting.read_metrics_json``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            write_metrics_json(pl_module.last_results, self.path)


class BadSampleReport(Callback):
    """What the model could not be shown. Samples skipped under ``on_bad_sample: skip`` are counted per
    dataset and reason and printed as a table (every rank's, gathered; printed by global rank 0) at the end
    of every training epoch and evaluation loop. The trailing objects cut from training samples that
    overflowed the LMM's context are logged as a running total, ``train/dropped_objects``."""

    def __init__(self) -> None:
        self.summary = BadSampleSummary()
        self.dropped_objects = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int):
        self.summary.update(batch.skipped)
        self.dropped_objects += sum(sample.num_dropped_objects for sample in batch.samples)
        pl_module.log("train/dropped_objects", float(self.dropped_objects), on_step=True, reduce_fx="max")

    def on_validation_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.summary.update(batch.skipped)

    def on_test_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.summary.update(batch.skipped)

    def _report(self, pl_module: LightningModule) -> None:
        # Every rank gets here at the same epoch end: the gather is collective.
        summary = BadSampleSummary()
        for rank_summary in all_gather_objects(self.summary):
            summary.merge(rank_summary)
        if summary.total:
            pl_module.print(f"skipped samples (on_bad_sample=skip):\n{summary}")
        self.summary.reset()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]):
        checkpoint.setdefault(COUNTERS_KEY, {})["dropped_objects"] = self.dropped_objects

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]):
        self.dropped_objects = checkpoint.get(COUNTERS_KEY, {}).get("dropped_objects", 0)


def with_training_guards(callbacks: list[Callback]) -> list[Callback]:
    """``callbacks`` plus a ``FinalCheckpoint``, a ``NonFiniteLossGuard`` and a ``BadSampleReport`` where they
    have none: a training run keeps them whatever its callbacks config says (``callbacks=none`` included). The
    final checkpoint goes first, so that it is written before any other callback ends the run."""
    missing = {
        kind: kind()
        for kind in (FinalCheckpoint, NonFiniteLossGuard, BadSampleReport)
        if not any(isinstance(c, kind) for c in callbacks)
    }
    final = [missing.pop(FinalCheckpoint)] if FinalCheckpoint in missing else []
    return [*final, *callbacks, *missing.values()]
