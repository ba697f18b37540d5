"""The LightningModule: a thin Lightning shell around the model core (``core.FLMM``) that adds the optimiser
and its schedule, the evaluation of grounding splits (``training.evaluation``; reasoning splits have their
own evaluator, ``training.reasoning_eval``), and the checkpoint format. Cross-cutting training policies are
callbacks (``training.reliability.NonFiniteLossGuard``, ``training.callbacks.BadSampleReport``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from flmm_lightning.common.masks import mask_iou
from flmm_lightning.core import FLMM, SELECTOR_TERM, GroundingPrediction
from flmm_lightning.data.batch import GroundingBatch
from flmm_lightning.data.reasonseg import REASONING_KIND
from flmm_lightning.heads.sam_refiner import SamRefiner, binarize_coarse
from flmm_lightning.heads.unet import UNetMaskHead
from flmm_lightning.lmm.base import FrozenLMM
from flmm_lightning.metrics import SplitMetrics
from flmm_lightning.selection.targets import narrative_selection_spans
from flmm_lightning.training.evaluation import EvalStepOutput, SplitEvaluation

# The core's state-dict keys inside this module's (``self.model``); checkpoints written before the core
# existed have the core's keys without it.
MODEL_PREFIX = "model."


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


class FLMMModule(SplitEvaluation):
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
        self._narrative_tokenizer: Any = None  # the LMM's tokenizer, to score the selector on narratives

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
    def split_metrics(self, name: str, kind: str) -> SplitMetrics:
        if kind == REASONING_KIND:
            raise ValueError(
                f"evaluation split {name} is a reasoning split (eval_kind {kind!r}): its queries are "
                "answered by the LMM, which FLMMModule does not do; evaluate it with the reasoning "
                "evaluator (training.reasoning_eval.ReasoningEvaluator: python -m flmm_lightning.eval "
                "data=<its config>, or reasonseg_after_fit.data in training)"
            )
        return SplitMetrics(kind, keyword_selection=self.model.has_keyword_selector and kind == "png")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and self.model.has_keyword_selector:
            self._narrative_tokenizer = datamodule.prompt_builder.processor.tokenizer

    def evaluate(self, batch: GroundingBatch, metrics: SplitMetrics) -> EvalStepOutput:
        output = EvalStepOutput(batch, [], [], [], [])
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
