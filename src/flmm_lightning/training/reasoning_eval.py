"""Evaluation of reasoning splits (F-LMM's ReasonSeg protocol) as a LightningModule: each query is answered
by the frozen LMM and segmented from its answer through the inference pipeline
(``inference.reasoning.reason_and_segment``, ``Grounder.segment``'s path), which encodes it; the split's
loader gives the samples unencoded (``data.datamodule.GroundingDataModule.is_reasoning``)."""

from __future__ import annotations

from typing import Any

import torch

from flmm_lightning.boundaries import GroundingSample, PromptBuilder
from flmm_lightning.common.masks import mask_iou
from flmm_lightning.core import FLMM
from flmm_lightning.data.batch import SampleBatch
from flmm_lightning.data.reasonseg import REASONING_KIND, is_sentence_query
from flmm_lightning.inference.pipeline import GroundingRunner
from flmm_lightning.inference.reasoning import EmptyAnswerError, reason_and_segment
from flmm_lightning.metrics import SplitMetrics
from flmm_lightning.training.evaluation import EvalStepOutput, SplitEvaluation


class ReasoningEvaluator(SplitEvaluation):
    """Scores the datamodule's reasoning splits with the model core ``model`` (trained elsewhere: nothing
    here trains); ``settings`` are ``inference.reasoning.reason_and_segment``'s keyword arguments
    (``max_new_tokens``, ``tokens``, ``answer_prefix``, generation settings), its defaults where not given.
    Its step output and ``last_results`` are ``FLMMModule``'s, so the same callbacks write the per-object
    table, overlays and metrics.json."""

    def __init__(
        self, model: FLMM, prompt_builder: PromptBuilder, sam_image_size: int, **settings: Any
    ) -> None:
        super().__init__()
        self.model = model
        self.runner = GroundingRunner(model, prompt_builder, sam_image_size)
        self.settings = settings

    def split_metrics(self, name: str, kind: str) -> SplitMetrics:
        if kind != REASONING_KIND:
            raise ValueError(
                f"evaluation split {name} is scored as {kind!r}, not a reasoning split: evaluate it with "
                "FLMMModule"
            )
        return SplitMetrics(kind)

    def evaluate(self, batch: SampleBatch, metrics: SplitMetrics) -> EvalStepOutput:
        output = EvalStepOutput(batch, [], [], [], [])
        for sample in batch.samples:
            self._reason(sample, metrics, output)
        return output

    def _reason(self, sample: GroundingSample, metrics: SplitMetrics, output: EvalStepOutput) -> None:
        """Every query of ``sample`` answered by the LMM and segmented from its answer; an answer that ends
        right after the prefix segments nothing (an empty mask)."""
        is_sentence = sample.is_sentence
        if is_sentence is None:
            is_sentence = torch.tensor([is_sentence_query(query) for query in sample.phrases])
        fine, coarse = [], []
        for query, sentence in zip(sample.phrases, is_sentence.tolist(), strict=True):
            try:
                result = reason_and_segment(self.runner, sample.image, query, sentence, **self.settings)
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
