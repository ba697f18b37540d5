"""The LightningModule: frozen LMM -> U-Net mask head -> SAM refiner -> losses and metrics."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lightning import LightningModule
from torch import nn

from flmm_lightning.data.bad_samples import BadSampleSummary
from flmm_lightning.data.batch import GroundingBatch
from flmm_lightning.heads.losses import MaskLosses, mask_losses
from flmm_lightning.heads.sam_refiner import SamRefiner, binarize_coarse
from flmm_lightning.heads.unet import UNetMaskHead, crop_to_content
from flmm_lightning.lmm.base import FrozenLMM, GroundingFeatures
from flmm_lightning.metrics import SplitMetrics
from flmm_lightning.metrics.functional import mask_iou
from flmm_lightning.reliability import NonFiniteStreak
from flmm_lightning.selection.targets import narrative_selection_spans, narrative_selector_loss

# Parameters under these prefixes are frozen and come from their own pretrained files: never checkpointed.
FROZEN_PREFIXES = ("lmm.model.", "sam.sam.image_encoder.")


@dataclass
class GroundingPrediction:
    """Mask logits of every object of one sample."""

    coarse_logits: torch.Tensor  # [n, h, w] at the U-Net's output size, processor padding removed
    fine_logits: torch.Tensor  # [n, H, W] at the image's own size
    features: GroundingFeatures


@dataclass
class EvalStepOutput:
    """What a validation/test step hands to callbacks (overlays, per-object tables)."""

    batch: GroundingBatch
    pred_masks: list[torch.Tensor]  # bool [n, H, W] per sample: the fine (SAM) masks
    ious: list[torch.Tensor]  # float64 [n] per sample: mask IoU of the fine masks
    coarse_masks: list[torch.Tensor]  # bool [n, H, W] per sample: the U-Net's masks at the image's size
    coarse_ious: list[torch.Tensor]  # float64 [n] per sample


class CheckpointMismatchError(RuntimeError):
    """A checkpoint that does not fit this model (other LMM, missing or misshapen trainable weights)."""


def warmup_cosine_factor(
    step: int, total_steps: int, warmup_ratio: float, warmup_start_factor: float
) -> float:
    """Learning-rate factor: linear warm-up from ``warmup_start_factor`` over the first ``warmup_ratio`` of
    the steps, then cosine decay to 0 over the rest (the paper recipe)."""
    warmup_steps = max(1, round(total_steps * warmup_ratio))
    if step < warmup_steps:
        return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class FLMMModule(LightningModule):
    def __init__(
        self,
        lmm: FrozenLMM,
        sam: SamRefiner,
        mask_head: Callable[[int], UNetMaskHead],
        optimizer: Callable[..., torch.optim.Optimizer],
        warmup_ratio: float = 0.03,
        warmup_start_factor: float = 1e-5,
        coarse_bce_weight: float = 1.0,
        coarse_dice_weight: float = 1.0,
        fine_bce_weight: float = 1.0,
        fine_dice_weight: float = 1.0,
        max_consecutive_nonfinite: int = 10,
        eval_heads_fp32: bool = True,
        keyword_selector_weight: float = 1.0,
    ) -> None:
        """``eval_heads_fp32``: outside training (validation, test, prediction) the U-Net and SAM run in
        fp32 with autocast off, as in the reference's evaluation, whatever the trainer's precision; the LMM
        (and the text projection that reads it) keeps the trainer's precision. Training is unaffected.
        ``keyword_selector_weight``: weight of the keyword selector's token loss (narrative samples only),
        when the LMM adapter has a selector."""
        super().__init__()
        self.lmm = lmm
        self.sam = sam
        self.mask_head = mask_head(lmm.attention_channels)
        self.optimizer_factory = optimizer
        self.warmup_ratio = warmup_ratio
        self.warmup_start_factor = warmup_start_factor
        self.loss_weights = {
            "coarse_bce": coarse_bce_weight,
            "coarse_dice": coarse_dice_weight,
            "fine_bce": fine_bce_weight,
            "fine_dice": fine_dice_weight,
        }
        self.has_keyword_selector = getattr(lmm, "keyword_selector", None) is not None
        if self.has_keyword_selector:
            self.loss_weights["keyword_selector"] = keyword_selector_weight
        self._narrative_tokenizer: Any = None  # the LMM's tokenizer, to score the selector on narratives
        # The resolved config (plain containers) rides in every checkpoint so that eval/predict rebuild
        # the same model from ``ckpt=`` alone.
        self.run_config: dict[str, Any] = {}
        self.eval_metrics = nn.ModuleDict()
        self.bad_samples = BadSampleSummary()
        self.nonfinite = NonFiniteStreak(max_consecutive_nonfinite)
        # What the batches since the last optimizer step said (more than one under gradient accumulation).
        self._window_nonfinite = False
        self._window_has_samples = False
        self.dropped_objects = 0  # objects cut from training samples that overflowed the LMM's context
        self.eval_heads_fp32 = eval_heads_fp32

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, batch: GroundingBatch) -> list[GroundingPrediction]:
        return self.decode(batch, self.lmm(batch.lmm))

    def decode(self, batch: GroundingBatch, features: list[GroundingFeatures]) -> list[GroundingPrediction]:
        """The masks of the objects that ``features`` (the LMM's readout of ``batch``) describe."""
        with self._head_precision():
            coarse, fine = self._heads(batch, features)
        return [GroundingPrediction(c, f, feat) for c, f, feat in zip(coarse, fine, features, strict=True)]

    def _heads(
        self, batch: GroundingBatch, features: list[GroundingFeatures]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Coarse (U-Net) and fine (SAM) logits of every sample."""
        coarse = self._coarse_logits(features)
        image_embeddings = self.sam.encode_images(batch.sam_images)
        fine = self.sam(
            image_embeddings,
            coarse,
            [f.text_embeddings for f in features],
            input_sizes=[tuple(image.shape[-2:]) for image in batch.sam_images],
            original_sizes=[(s.image.height, s.image.width) for s in batch.samples],
        )
        return coarse, fine

    def _head_precision(self) -> contextlib.AbstractContextManager:
        """Autocast off around the heads outside training when ``eval_heads_fp32`` (see ``__init__``)."""
        if self.training or not self.eval_heads_fp32:
            return contextlib.nullcontext()
        device_type = next(self.mask_head.parameters()).device.type
        return torch.autocast(device_type=device_type, enabled=False)

    def _coarse_logits(self, features: list[GroundingFeatures]) -> list[torch.Tensor]:
        """Runs the U-Net once per distinct grid size (it treats every object independently)."""
        by_grid: dict[tuple[int, ...], list[int]] = {}
        for index, feature in enumerate(features):
            by_grid.setdefault(tuple(feature.attention_maps.shape[-2:]), []).append(index)
        coarse: list[torch.Tensor | None] = [None] * len(features)
        for indices in by_grid.values():
            maps = torch.cat([features[i].attention_maps for i in indices])  # [sum n, C, h, w]
            logits = self.mask_head(maps.to(self.mask_head_dtype))  # [sum n, h', w']
            sizes = [len(features[i].attention_maps) for i in indices]
            for i, chunk in zip(indices, logits.split(sizes), strict=True):
                coarse[i] = crop_to_content(chunk, features[i].padded_hw, features[i].content_box)
        return coarse

    @property
    def mask_head_dtype(self) -> torch.dtype:
        return next(self.mask_head.parameters()).dtype

    # ----------------------------------------------------------------------------------------- training
    def _losses(
        self, batch: GroundingBatch, predictions: list[GroundingPrediction]
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses weighted by the sample's object count, as the reference averages them."""
        totals: dict[str, torch.Tensor] = {}
        num_objects = 0
        for sample, prediction in zip(batch.samples, predictions, strict=True):
            gt = sample.masks.to(prediction.fine_logits.device)
            n = sample.num_objects
            for stage, logits in (("coarse", prediction.coarse_logits), ("fine", prediction.fine_logits)):
                stage_losses: MaskLosses = mask_losses(logits, gt)
                for name in ("bce", "dice", "accuracy", "iou"):
                    key = f"{stage}_{name}"
                    totals[key] = totals.get(key, 0.0) + getattr(stage_losses, name) * n
            num_objects += n
        averaged = {key: value / num_objects for key, value in totals.items()}
        if self.has_keyword_selector:
            logits = [prediction.features.selector_logits for prediction in predictions]
            averaged["keyword_selector"] = narrative_selector_loss(batch.lmm, batch.samples, logits)
        averaged["loss"] = sum(weight * averaged[key] for key, weight in self.loss_weights.items())
        return averaged

    def training_step(self, batch: GroundingBatch, batch_idx: int) -> torch.Tensor:
        """The loss to back-propagate; a zero loss (all gradients 0) when the step is to be skipped.

        A NaN/Inf loss must not reach the weights. Returning None would skip backward on this rank only, and
        under DDP the other ranks would wait forever in their gradient all-reduce; and back-propagating
        ``loss * 0`` would still give NaN gradients (NaN * 0). So every rank learns, through one all-reduce
        per step, whether any rank's loss is non-finite; if so, every rank back-propagates a loss that is
        exactly zero and ``on_before_optimizer_step`` drops the gradients, which makes the optimizer leave
        the weights, moments and weight decay untouched. Skipped steps still count as steps (the schedule
        and ``max_steps`` do not move).
        """
        self.bad_samples.update(batch.skipped)
        loss: torch.Tensor | None = None
        if batch.samples:
            losses = self._losses(batch, self(batch))
            loss = losses.pop("loss")
        local_nonfinite = loss is not None and not bool(torch.isfinite(loss))
        flags = torch.tensor([float(local_nonfinite), float(loss is not None)], device=self.device)
        nonfinite_ranks, ranks_with_samples = self.trainer.strategy.reduce(flags, reduce_op="sum").tolist()
        self._window_nonfinite |= nonfinite_ranks > 0
        self._window_has_samples |= ranks_with_samples > 0

        self.dropped_objects += sum(sample.num_dropped_objects for sample in batch.samples)
        self.log("train/dropped_objects", float(self.dropped_objects), on_step=True, reduce_fx="max")
        if nonfinite_ranks > 0:
            names = [f"{s.image_id} ({s.file_name})" for s in batch.samples] if local_nonfinite else []
            self.nonfinite.record(self.global_step, names)
            if self.nonfinite.exhausted:
                raise self.nonfinite.error()
            return self._zero_loss()
        if ranks_with_samples > 0:
            self.nonfinite.reset()
        if loss is None:
            # Other ranks have samples: this one still joins their gradient all-reduce, with zeros.
            return self._zero_loss()
        self.log_dict({f"train/{key}": value for key, value in losses.items()}, batch_size=len(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def _zero_loss(self) -> torch.Tensor:
        """Exactly 0, with a (zero) gradient for every trainable parameter, so DDP's all-reduce completes."""
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        skip = self._window_nonfinite or not self._window_has_samples
        if self._window_nonfinite:
            self.nonfinite.skipped_steps += 1
        self._window_nonfinite = self._window_has_samples = False
        self.log("train/skipped_nonfinite_steps", float(self.nonfinite.skipped_steps), reduce_fx="max")
        if skip:
            # Optimizers skip parameters whose gradient is None: no update, no moment or weight-decay change.
            optimizer.zero_grad(set_to_none=True)

    def on_train_epoch_end(self) -> None:
        self._report_bad_samples()

    def _report_bad_samples(self) -> None:
        # Every rank gets here at the same epoch end; rank 0 prints what all of them skipped.
        summary = self.bad_samples
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[BadSampleSummary | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.bad_samples)
            summary = BadSampleSummary()
            for rank_summary in gathered:
                summary.merge(rank_summary)
        if summary.total:
            self.print(f"skipped samples (on_bad_sample=skip):\n{summary}")
        self.bad_samples.reset()

    # ----------------------------------------------------------------------------------------- evaluation
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        for name in dict.fromkeys(datamodule.val_names + datamodule.test_names):
            if name not in self.eval_metrics:
                kind = datamodule.split_kind(name)
                selection = self.has_keyword_selector and kind == "png"
                self.eval_metrics[name] = SplitMetrics(kind, keyword_selection=selection)
        if self.has_keyword_selector:
            self._narrative_tokenizer = datamodule.prompt_builder.processor.tokenizer
        self._split_names = {"validate": datamodule.val_names, "test": datamodule.test_names}

    def _eval_step(self, batch: GroundingBatch, dataloader_idx: int, stage: str) -> EvalStepOutput:
        split = self._split_names[stage][dataloader_idx]
        metrics: SplitMetrics = self.eval_metrics[split]
        self.bad_samples.update(batch.skipped)
        output = EvalStepOutput(batch, [], [], [], [])
        if not batch.samples:
            return output
        for sample, prediction in zip(batch.samples, self(batch), strict=True):
            gt = sample.masks.to(prediction.fine_logits.device)
            # Binarised as the reference's evaluation does it: sigmoid, bilinear resize to the image, > 0.5.
            # The fine logits are already at the image's size, where that is "logit > 0"; for the coarse ones
            # it is the very mask whose box prompts SAM.
            fine = prediction.fine_logits > 0
            coarse = binarize_coarse(prediction.coarse_logits, tuple(gt.shape[-2:]))
            metrics.update(fine, coarse, gt, sample.is_thing.to(gt.device), sample.is_plural.to(gt.device))
            if metrics.selection is not None:
                logits = prediction.features.selector_logits
                spans = narrative_selection_spans(self._narrative_tokenizer, sample.utterances, logits)
                metrics.selection.update(*spans)
            output.pred_masks.append(fine)
            output.ious.append(mask_iou(fine, gt))
            output.coarse_masks.append(coarse)
            output.coarse_ious.append(mask_iou(coarse, gt))
        return output

    def validation_step(
        self, batch: GroundingBatch, batch_idx: int, dataloader_idx: int = 0
    ) -> EvalStepOutput:
        return self._eval_step(batch, dataloader_idx, "validate")

    def test_step(self, batch: GroundingBatch, batch_idx: int, dataloader_idx: int = 0) -> EvalStepOutput:
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
        self._report_bad_samples()

    def on_validation_epoch_end(self) -> None:
        self._log_split_results("validate")

    def on_test_epoch_end(self) -> None:
        self._log_split_results("test")

    # ----------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine_factor(step, total_steps, self.warmup_ratio, self.warmup_start_factor),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # A resumed optimizer carries the learning rate of the run that wrote the checkpoint; when this run
        # has another length (e.g. a larger max_steps) its schedule differs, so realign the current step's lr.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                factors = [schedule(scheduler.last_epoch) for schedule in scheduler.lr_lambdas]
                for group, base_lr, factor in zip(
                    scheduler.optimizer.param_groups, scheduler.base_lrs, factors, strict=True
                ):
                    group["lr"] = base_lr * factor

    # ----------------------------------------------------------------------------------------- checkpoints
    def train(self, mode: bool = True) -> FLMMModule:
        super().train(mode)
        # Frozen parts stay in eval mode whatever Lightning asks (dropout/norm statistics untouched).
        self.lmm.model.eval()
        self.sam.sam.image_encoder.eval()
        return self

    def trainable_keys(self) -> Iterator[str]:
        for key in super().state_dict(keep_vars=True):
            if not key.startswith(FROZEN_PREFIXES):
                yield key

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        return {k: v for k, v in full.items() if not k[len(prefix) :].startswith(FROZEN_PREFIXES)}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Loads the trainable part; a missing, unexpected or misshapen trainable key is an error naming it"""
        trainable = {k: v for k, v in super().state_dict().items() if not k.startswith(FROZEN_PREFIXES)}
        problems = []
        missing = sorted(set(trainable) - set(state_dict))
        if missing:
            problems.append(f"missing trainable keys: {', '.join(missing[:10])}")
        unexpected = sorted(set(state_dict) - set(trainable))
        if unexpected:
            problems.append(f"keys this model does not have: {', '.join(unexpected[:10])}")
        for key in sorted(set(trainable) & set(state_dict)):
            if state_dict[key].shape != trainable[key].shape:
                problems.append(
                    f"{key}: shape {tuple(state_dict[key].shape)} in the checkpoint, "
                    f"{tuple(trainable[key].shape)} in the model"
                )
        if problems and strict:
            raise CheckpointMismatchError(
                "checkpoint does not fit this model: "
                + "; ".join(problems)
                + f". U-Net input channels follow the LMM (layers x heads = {self.lmm.attention_channels} "
                "here): a checkpoint trained with another LMM does not fit."
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["flmm_config"] = self.run_config
        checkpoint["flmm_counters"] = {
            "skipped_nonfinite_steps": self.nonfinite.skipped_steps,
            "dropped_objects": self.dropped_objects,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A resumed run keeps counting where it stopped (older checkpoints have no counters).
        counters = checkpoint.get("flmm_counters", {})
        self.nonfinite.skipped_steps = counters.get("skipped_nonfinite_steps", 0)
        self.dropped_objects = counters.get("dropped_objects", 0)
