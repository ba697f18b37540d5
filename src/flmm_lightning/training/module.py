"""The LightningModule: a thin Lightning shell around the model core (``core.FLMM``) that adds the optimiser
and its schedule, the evaluation metrics, and the checkpoint format. Cross-cutting training policies are
callbacks (``training.reliability.NonFiniteLossGuard``, ``training.callbacks.BadSampleReport``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from lightning import LightningModule
from torch import nn

from flmm_lightning.boundaries import GroundingSample
from flmm_lightning.common.masks import mask_iou
from flmm_lightning.core import FLMM, SELECTOR_TERM, GroundingPrediction
from flmm_lightning.data.batch import GroundingBatch
from flmm_lightning.data.reasonseg import is_sentence_query
from flmm_lightning.heads.sam_refiner import SamRefiner, binarize_coarse
from flmm_lightning.heads.unet import UNetMaskHead
from flmm_lightning.inference.pipeline import GroundingRunner
from flmm_lightning.inference.reasoning import EmptyAnswerError, reason_and_segment
from flmm_lightning.lmm.base import FrozenLMM
from flmm_lightning.metrics import SplitMetrics
from flmm_lightning.selection.targets import narrative_selection_spans

# The core's state-dict keys inside this module's (``self.model``); checkpoints written before the core
# existed have the core's keys without it.
MODEL_PREFIX = "model."


@dataclass
class EvalStepOutput:
    """What a validation/test step hands to callbacks (overlays, per-object tables)."""

    batch: GroundingBatch
    pred_masks: list[torch.Tensor]  # bool [n, H, W] per sample: the fine (SAM) masks
    ious: list[torch.Tensor]  # float64 [n] per sample: mask IoU of the fine masks
    coarse_masks: list[torch.Tensor]  # bool [n, H, W] per sample: the U-Net's masks at the image's size
    coarse_ious: list[torch.Tensor]  # float64 [n] per sample


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


def core_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``state_dict`` with the core's keys: this module's ``model.`` prefix removed (one
    written before the core existed has the core's keys already)."""
    return {key.removeprefix(MODEL_PREFIX): value for key, value in state_dict.items()}


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
        keyword_selector_lr: float | None = None,
    ) -> None:
        """``mask_head`` is called with the LMM's attention channels; the loss weights and
        ``eval_heads_fp32`` are the core's (``core.FLMM``; ``keyword_selector_weight`` weighs the keyword
        selector's token loss on narrative samples when the LMM adapter has a selector;
        ``keyword_selector_lr``, when set, is the selector's own learning rate, the optimizer's for the rest);
        ``max_consecutive_nonfinite`` is read by ``training.reliability.NonFiniteLossGuard``."""
        super().__init__()
        self.model = FLMM(
            lmm,
            sam,
            mask_head(lmm.attention_channels),
            loss_weights={
                "coarse_bce": coarse_bce_weight,
                "coarse_dice": coarse_dice_weight,
                "fine_bce": fine_bce_weight,
                "fine_dice": fine_dice_weight,
                SELECTOR_TERM: keyword_selector_weight,
            },
            eval_heads_fp32=eval_heads_fp32,
        )
        self.optimizer_factory = optimizer
        self.keyword_selector_lr = keyword_selector_lr
        self.warmup_ratio = warmup_ratio
        self.warmup_start_factor = warmup_start_factor
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.eval_metrics = nn.ModuleDict()
        self._narrative_tokenizer: Any = None  # the LMM's tokenizer, to score the selector on narratives
        # Reasoning (``"reasonseg"``) splits: each query is answered by the frozen LMM through
        # ``reasoning.reason_and_segment`` (``Grounder.segment``'s path) with these keyword arguments
        # (``max_new_tokens``, ``tokens``, ``answer_prefix``, generation settings); the entry points set them.
        self.reasoning_settings: dict[str, Any] = {}
        self._reasoner: GroundingRunner | None = None

    def forward(self, batch: GroundingBatch) -> list[GroundingPrediction]:
        return self.model(batch)

    # ----------------------------------------------------------------------------------------- training
    def training_step(self, batch: GroundingBatch, batch_idx: int) -> torch.Tensor:
        """The batch's loss. When all of its samples were skipped, a loss that is exactly zero (with a zero
        gradient for every trainable parameter): this rank still joins DDP's gradient all-reduce.
        ``NonFiniteLossGuard`` keeps a non-finite loss from reaching the weights; it is not logged."""
        if not batch.samples:
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        losses = self.model.losses(batch, self.model(batch))
        loss = losses.pop("loss")
        if torch.isfinite(loss):
            self.log_dict({f"train/{key}": value for key, value in losses.items()}, batch_size=len(batch))
            self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    # ----------------------------------------------------------------------------------------- evaluation
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        for name in dict.fromkeys(datamodule.val_names + datamodule.test_names):
            if name not in self.eval_metrics:
                kind = datamodule.split_kind(name)
                selection = self.model.has_keyword_selector and kind == "png"
                self.eval_metrics[name] = SplitMetrics(kind, keyword_selection=selection)
        if self.model.has_keyword_selector:
            self._narrative_tokenizer = datamodule.prompt_builder.processor.tokenizer
        self._reasoner = GroundingRunner(self.model, datamodule.prompt_builder, datamodule.sam_image_size)
        self._split_names = {"validate": datamodule.val_names, "test": datamodule.test_names}

    def _eval_step(self, batch: GroundingBatch, dataloader_idx: int, stage: str) -> EvalStepOutput:
        split = self._split_names[stage][dataloader_idx]
        metrics: SplitMetrics = self.eval_metrics[split]
        output = EvalStepOutput(batch, [], [], [], [])
        if not batch.samples:
            return output
        if metrics.kind == "reasonseg":
            for sample in batch.samples:
                self._reasoning_step(sample, metrics, output)
            return output
        for sample, prediction in zip(batch.samples, self.model(batch), strict=True):
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

    def _reasoning_step(self, sample: GroundingSample, metrics: SplitMetrics, output: EvalStepOutput) -> None:
        """Every query of ``sample`` answered by the LMM and segmented from its answer; an answer that ends
        right after the prefix segments nothing (an empty mask)."""
        is_sentence = sample.is_sentence
        if is_sentence is None:
            is_sentence = torch.tensor([is_sentence_query(query) for query in sample.phrases])
        fine, coarse = [], []
        for query, sentence in zip(sample.phrases, is_sentence.tolist(), strict=True):
            try:
                result = reason_and_segment(
                    self._reasoner, sample.image, query, sentence, **self.reasoning_settings
                )
                fine.append(result.mask)
                coarse.append(result.coarse_mask)
            except EmptyAnswerError:
                fine.append(torch.zeros(sample.masks.shape[1:], dtype=torch.bool))
                coarse.append(fine[-1])
        gt = sample.masks.to(self.device)
        fine_masks, coarse_masks = torch.stack(fine).to(gt.device), torch.stack(coarse).to(gt.device)
        ignore = None if sample.ignore_masks is None else sample.ignore_masks.to(gt.device)
        unused = torch.zeros(len(gt), dtype=torch.bool, device=gt.device)  # PNG's flags
        metrics.update(fine_masks, coarse_masks, gt, unused, unused, is_sentence.to(gt.device), ignore)
        # Per-query IoU as the metric counts it: ignored pixels belong to neither mask.
        kept = torch.ones_like(gt) if ignore is None else ~ignore
        output.pred_masks.append(fine_masks)
        output.ious.append(mask_iou(fine_masks & kept, gt & kept))
        output.coarse_masks.append(coarse_masks)
        output.coarse_ious.append(mask_iou(coarse_masks & kept, gt & kept))

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

    def on_validation_epoch_end(self) -> None:
        self._log_split_results("validate")

    def on_test_epoch_end(self) -> None:
        self._log_split_results("test")

    # ----------------------------------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: every trainable parameter at the optimizer's learning rate, the
        keyword selector's in a group of its own at ``keyword_selector_lr`` when that is set."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        if self.keyword_selector_lr is None or not self.model.has_keyword_selector:
            return [{"params": trainable}]
        selector = {id(p) for p in self.model.lmm.keyword_selector.parameters()}
        # Named groups: the learning-rate monitor logs each under its name.
        return [
            {"params": [p for p in trainable if id(p) not in selector], "name": "heads"},
            {
                "params": [p for p in trainable if id(p) in selector],
                "lr": self.keyword_selector_lr,
                "name": SELECTOR_TERM,
            },
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(params=self.parameter_groups())
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
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checks the checkpoint's weights against this model before Lightning loads them (a mismatch raises
        ``CheckpointMismatchError`` naming the keys, and nothing is loaded); a checkpoint written before the
        core existed gets this layout's keys."""
        core = core_state_dict(checkpoint["state_dict"])
        self.model.check_trainable_state_dict(core)
        checkpoint["state_dict"] = {MODEL_PREFIX + key: value for key, value in core.items()}

    def load_checkpoint_weights(self, state_dict: Mapping[str, Any]) -> None:
        """Loads a checkpoint's ``state_dict`` (either layout) into the core, checked first."""
        self.model.load_trainable_state_dict(core_state_dict(state_dict))
