"""The prediction step of a batch run: the model core on a batch of inputs, each turned into its output
line (masks as COCO RLE, boxes, areas, mask scores; a query's answer; a failed input's reason)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning import LightningModule
from torchvision.ops import masks_to_boxes

from flmm_lightning.boundaries import ContextOverflowError, GroundingSample, PromptBuilder
from flmm_lightning.common.masks import mask_record, mask_scores
from flmm_lightning.core import FLMM, GroundingPrediction
from flmm_lightning.inference.batch.dataset import PredictionBatch
from flmm_lightning.inference.batch.manifest import ManifestEntry
from flmm_lightning.inference.batch.output import InputResult
from flmm_lightning.inference.conversation import ChatInputError
from flmm_lightning.inference.pipeline import GroundingRunner
from flmm_lightning.inference.reasoning import EmptyAnswerError, reason_and_segment
from flmm_lightning.outputs.documents import empty_mask_notices
from flmm_lightning.outputs.overlays import overlay_masks


def grounded_objects(prediction: GroundingPrediction) -> tuple[torch.Tensor, torch.Tensor, list[list | None]]:
    """The bool ``[n, H, W]`` masks of a prediction (fine logit > 0), their scores ``[n]`` and inclusive
    ``[x0, y0, x1, y1]`` boxes (None for an empty mask), on the CPU."""
    logits = prediction.fine_logits.float().cpu()  # [n, H, W]
    masks = logits > 0
    scores = mask_scores(logits, masks)
    nonempty = masks.flatten(1).any(1)
    boxes: list[list | None] = [None] * len(masks)
    if nonempty.any():
        for index, box in zip(
            nonempty.nonzero()[:, 0].tolist(), masks_to_boxes(masks[nonempty]), strict=True
        ):
            boxes[index] = box.tolist()
    return masks, scores, boxes


class BatchPredictor(LightningModule):
    """Grounds a ``PredictionBatch`` with the model core: the inputs with phrases in one batched forward
    (the evaluation's path), each query answered by the frozen LMM and segmented
    (``reasoning.reason_and_segment``, ``Grounder.segment``'s path). ``overlays``: also draw each input's
    masks on its image; ``generation``: how the LMM answers a query (``generate``'s keyword arguments)."""

    def __init__(
        self,
        model: FLMM,
        prompt_builder: PromptBuilder,
        sam_image_size: int,
        overlays: bool = False,
        generation: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.prompt_builder = prompt_builder
        self.sam_image_size = sam_image_size
        self.overlays = overlays
        self.generation = dict(generation or {})

    @torch.no_grad()
    def predict_step(self, batch: PredictionBatch, batch_idx: int = 0) -> list[InputResult]:
        """One result per input of the batch, in manifest order."""
        results = [InputResult(_error_record(entry, error)) for entry, error in batch.failed]
        if batch.grounded:
            predictions = self.model(batch.grounding)
            for entry, sample, prediction in zip(
                batch.grounded, batch.grounding.samples, predictions, strict=True
            ):
                results.append(self._grounded(entry, sample, prediction))
        runner = GroundingRunner(self.model, self.prompt_builder, self.sam_image_size)
        for entry, photo in batch.queries:
            results.append(self._reasoned(runner, entry, photo))
        return sorted(results, key=lambda result: result.record["index"])

    def _grounded(
        self, entry: ManifestEntry, sample: GroundingSample, prediction: GroundingPrediction
    ) -> InputResult:
        masks, scores, boxes = grounded_objects(prediction)
        objects = [
            {"phrase": phrase, **mask_record(mask, box), "mask_score": float(score)}
            for phrase, mask, box, score in zip(sample.phrases, masks, boxes, scores, strict=True)
        ]
        record = {
            "index": entry.index,
            "id": entry.id,
            "image": entry.image,
            "objects": objects,
            "notices": empty_mask_notices(objects),
        }
        overlay = overlay_masks(sample.image, masks, sample.phrases) if self.overlays else None
        return InputResult(record, overlay)

    def _reasoned(self, runner: GroundingRunner, entry: ManifestEntry, photo: Any) -> InputResult:
        try:
            result = reason_and_segment(runner, photo, entry.query, **self.generation)
        except (EmptyAnswerError, ChatInputError, ContextOverflowError) as error:
            return InputResult(_error_record(entry, f"{type(error).__name__}: {error}"))
        record = {
            "index": entry.index,
            "id": entry.id,
            "image": entry.image,
            "query": result.query,
            "question": result.question,
            "answer": result.answer,
            **mask_record(result.mask, result.box),
        }
        record["notices"] = empty_mask_notices([record], label="answer")
        overlay = overlay_masks(result.image, result.mask[None], [result.answer]) if self.overlays else None
        return InputResult(record, overlay)


def _error_record(entry: ManifestEntry, error: str) -> dict[str, Any]:
    return {"index": entry.index, "id": entry.id, "image": entry.image, "error": error}
