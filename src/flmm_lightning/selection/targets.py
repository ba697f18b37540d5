"""What the keyword selector learns from and is measured against: PNG narratives, whose grounded
utterances are the phrases to find and whose other utterances name nothing."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from flmm_lightning.boundaries import NOT_GROUNDED, GroundingSample, LMMBatch
from flmm_lightning.heads.losses import keyword_selector_loss
from flmm_lightning.metrics.keywords import KeywordSelectionMetric
from flmm_lightning.selection.phrases import (
    KEYWORD_THRESHOLD,
    Span,
    phrases_from_scores,
    strip_span,
    word_spans,
)


def selector_targets(
    mask_ids: torch.Tensor, attention_mask: torch.Tensor, utterance_start: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token labels and loss mask of a batch built by ``ChatPromptBuilder``.

    mask_ids: long ``[B, S]`` (object index per token, -1 elsewhere); attention_mask: ``[B, S]`` (0 on
    padding); utterance_start: long ``[B]``, where each sample's utterances begin (its prompt length).
    Returns ``labels`` bool ``[B, S]`` (the token belongs to a grounded utterance) and ``valid`` bool
    ``[B, S]`` (the token belongs to an utterance: neither prompt, image nor padding).
    """
    positions = torch.arange(mask_ids.shape[1], device=mask_ids.device)  # [S]
    valid = (positions[None, :] >= utterance_start[:, None].to(mask_ids.device)) & attention_mask.bool()
    return (mask_ids >= 0) & valid, valid


def narrative_selector_loss(
    batch: LMMBatch, samples: Sequence[GroundingSample], selector_logits: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``keyword_selector_loss`` over the utterance tokens of the batch's narrative samples
    (``GroundingSample.narrative``), each token weighted alike; 0 (still attached to the logits) without one.

    The other samples do not count: RefCOCO's "phrase . phrase ." names something in every phrase, so its
    tokens would teach the selector that every word is a keyword. ``selector_logits``: per sample ``[u_b]``,
    its utterance tokens in order (``GroundingFeatures.selector_logits``).
    """
    labels, valid = selector_targets(batch.mask_ids, batch.attention_mask, batch.utterance_start)  # [B, S]
    logits = torch.cat(list(selector_logits))  # [sum u_b]
    token_labels = torch.cat([labels[b][valid[b]] for b in range(len(samples))]).to(logits.device)
    counted = torch.cat(
        [torch.full((int(valid[b].sum()),), sample.narrative) for b, sample in enumerate(samples)]
    ).to(logits.device)
    if token_labels.shape != logits.shape:
        raise ValueError(f"{logits.shape[0]} selector logits for {token_labels.shape[0]} utterance tokens")
    return keyword_selector_loss(logits, token_labels, counted)


def narrative_selection_spans(
    tokenizer: PreTrainedTokenizerBase,
    utterances: Sequence[tuple[str, int]],
    selector_logits: torch.Tensor,
    threshold: float = KEYWORD_THRESHOLD,
) -> tuple[list[Span], list[Span]]:
    """The phrases a keyword selector marks in a narrative (``phrases_from_scores`` over its tokens, as a
    conversation's answer is read) and the narrative's grounded phrases, both as character spans of the
    narrative text: the two arguments of ``KeywordSelectionMetric.update``.

    ``selector_logits``: ``[u]``, one per utterance token as ``ChatPromptBuilder`` tokenises them.
    """
    text, targets = narrative_phrase_spans(utterances)
    offsets = narrative_token_offsets(tokenizer, utterances)
    phrases = phrases_from_scores(text, offsets, selector_logits.detach().float().sigmoid(), threshold)
    return [phrase.char_span for phrase in phrases], targets


def object_token_spans(token_objects: torch.Tensor | Sequence[int]) -> list[Span]:
    """Ground-truth phrases in token space: maximal runs of tokens of one object.

    token_objects: ``[T]`` object index per utterance token, ``NOT_GROUNDED`` (-1) for the others.
    """
    objects = [int(obj) for obj in token_objects]
    spans: list[Span] = []
    for i, obj in enumerate(objects):
        if obj == NOT_GROUNDED:
            continue
        if i > 0 and objects[i - 1] == obj:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


def narrative_phrase_spans(utterances: Sequence[tuple[str, int]]) -> tuple[str, list[Span]]:
    """The narrative text (its utterances joined) and the character spans of its grounded phrases: each run
    of utterances of one object, stripped of surrounding spaces and punctuation as selected phrases are."""
    text, spans, start = "", [], 0
    previous = NOT_GROUNDED
    for utterance, obj in utterances:
        end = start + len(utterance)
        if obj != NOT_GROUNDED and obj == previous:
            spans[-1] = (spans[-1][0], end)
        elif obj != NOT_GROUNDED:
            spans.append((start, end))
        text, start, previous = text + utterance, end, obj
    stripped = [strip_span(text, span) for span in spans]
    return text, [(s, e) for s, e in stripped if s < e]


def narrative_token_offsets(
    tokenizer: PreTrainedTokenizerBase, utterances: Sequence[tuple[str, int]]
) -> list[Span]:
    """Character span, in the narrative text, of every utterance token as ``ChatPromptBuilder`` tokenises
    them (each utterance on its own): the tokenizer's ``offset_mapping``, shifted by the utterance's start."""
    if not tokenizer.is_fast:
        raise ValueError(f"{type(tokenizer).__name__} gives no offset_mapping; a fast tokenizer is needed")
    offsets: list[Span] = []
    start = 0
    for utterance, _ in utterances:
        encoded = tokenizer(utterance, add_special_tokens=False, return_offsets_mapping=True)
        offsets += [(start + s, start + e) for s, e in encoded["offset_mapping"]]
        start += len(utterance)
    return offsets


def every_word_baseline(narratives: Iterable[Sequence[tuple[str, int]]]) -> dict[str, float]:
    """The selection metric of marking every word of each narrative as a phrase of its own (character
    spans against ``narrative_phrase_spans``): the floor a trained selector must clear."""
    metric = KeywordSelectionMetric()
    for utterances in narratives:
        text, targets = narrative_phrase_spans(utterances)
        metric.update(word_spans(text), targets)
    return metric.compute()
