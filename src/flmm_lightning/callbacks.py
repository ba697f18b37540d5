"""Callbacks: mask overlays (files and W&B panels) and the per-object table of an evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from flmm_lightning.data.sample import GroundingSample
from flmm_lightning.metrics.functional import mask_box_iou
from flmm_lightning.model import EvalStepOutput
from flmm_lightning.visualize import label_map, overlay_masks, side_by_side


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
                images = []
                for sample, pred in kept:
                    class_labels = {k + 1: phrase for k, phrase in enumerate(sample.phrases)}
                    images.append(
                        wandb.Image(
                            sample.image,
                            caption=" | ".join(sample.phrases),
                            masks={
                                "prediction": {"mask_data": label_map(pred), "class_labels": class_labels},
                                "ground_truth": {
                                    "mask_data": label_map(sample.masks),
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


class PerObjectRecorder(Callback):
    """Collects one row per evaluated object (image, phrase, mask IoU, box IoU) to find failures."""

    def __init__(self) -> None:
        self.rows: list[dict[str, object]] = []

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
        for sample, pred, ious in zip(outputs.batch.samples, outputs.pred_masks, outputs.ious, strict=True):
            box_ious = mask_box_iou(pred, sample.masks.to(pred.device))
            for k in range(sample.num_objects):
                self.rows.append(
                    {
                        "split": split,
                        "image_id": sample.image_id,
                        "file_name": sample.file_name,
                        "object_id": sample.object_ids[k],
                        "phrase": sample.phrases[k],
                        "iou": round(float(ious[k]), 6),
                        "box_iou": round(float(box_ious[k]), 6),
                    }
                )
