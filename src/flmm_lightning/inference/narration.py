"""Ground what you say, on PNG: the keyword selector chooses the phrases of a narrative read as the LMM's own
answer, each chosen phrase is grounded as a chat turn grounds it, and the narrative's grounded phrases are
scored by PNG's average recall, a phrase the selector missed with an empty mask (IoU 0)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from tqdm.auto import tqdm

from flmm_lightning.boundaries import GroundingSample
from flmm_lightning.inference.pipeline import GroundingRunner, ReadAnswer, read, select_and_decode
from flmm_lightning.metrics import PanopticNarrativeRecall
from flmm_lightning.selection import KEYWORD_THRESHOLD, AnswerPhrase, phrases_from_scores
from flmm_lightning.selection.targets import narrative_phrase_spans, narrative_token_offsets

Span = tuple[int, int]


def match_selected_phrases(
    token_objects: torch.Tensor | Sequence[int], selected: Sequence[Span], num_objects: int
) -> list[int | None]:
    """For each of the ``num_objects`` ground-truth objects ``k`` of a narrative, the selected phrase that
    grounds it: the one sharing the most tokens with the object's tokens (the first on a tie); None when no
    selected phrase touches them.

    token_objects: ``[u]`` object index of each utterance token, ``NOT_GROUNDED`` for the others;
    selected: token spans ``[first, last)`` of the chosen phrases over the same tokens.
    """
    objects = torch.as_tensor(token_objects).cpu()  # [u]
    matches: list[int | None] = []
    for k in range(num_objects):
        shared = [int((objects[first:last] == k).sum()) for first, last in selected]
        best = max(range(len(shared)), key=shared.__getitem__, default=None)
        matches.append(best if best is not None and shared[best] > 0 else None)
    return matches


@torch.no_grad()
def ground_what_you_say(
    grounder: GroundingRunner, samples: Iterable[GroundingSample], threshold: float = KEYWORD_THRESHOLD
) -> dict[str, float]:
    """PNG's figures (``PanopticNarrativeRecall``) of grounding what the keyword selector chooses from each
    narrative of ``samples`` (PNG samples; skipped ones are left out), rather than the annotated phrases."""
    if not grounder.model.has_keyword_selector:
        raise ValueError("ground what you say needs a checkpoint with a keyword selector")
    metric = PanopticNarrativeRecall()
    for sample in tqdm(samples, desc="ground what you say", leave=False):
        if not isinstance(sample, GroundingSample):
            continue
        encoded = grounder.encode.encode(sample)
        batch = move_data_to_device(grounder.collate([encoded]), grounder.device)
        readout = read(grounder, batch)
        start, count = int(batch.lmm.utterance_start[0]), int(readout.hidden_counts[0])
        token_objects = batch.lmm.mask_ids[0, start : start + count].cpu()  # [u]
        utterances = encoded.sample.utterances
        text, _ = narrative_phrase_spans(utterances)
        token_ids = batch.lmm.input_ids[0, start : start + count].tolist()
        offsets = narrative_token_offsets(grounder.tokenizer, utterances)
        narrative = ReadAnswer(token_ids, text, offsets, batch, readout)

        def select(narrative: ReadAnswer) -> list[AnswerPhrase]:
            scores = narrative.keyword_scores(grounder)  # [u]
            return phrases_from_scores(narrative.text, narrative.offsets, scores, threshold)

        grounded = select_and_decode(grounder, narrative, select)
        gt_masks = encoded.sample.masks
        predicted = torch.zeros_like(gt_masks)  # [n, H, W]: missed phrases stay empty
        if grounded.decoded is not None:
            spans = [phrase.token_span for phrase in grounded.chosen]
            for k, match in enumerate(match_selected_phrases(token_objects, spans, len(gt_masks))):
                if match is not None:
                    predicted[k] = grounded.decoded.fine[match]
        metric.update(predicted, gt_masks, encoded.sample.is_thing, encoded.sample.is_plural)
    return {name: float(value) for name, value in metric.compute().items()}
