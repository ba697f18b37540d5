"""Reasoning segmentation (F-LMM's ReasonSeg protocol) on the inference pipeline: the frozen LMM answers a
query briefly after a forced prefix ("It is"), and the generated tokens' attention is merged into one object
and decoded by the U-Net and SAM as in training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from flmm_lightning.data.reasonseg import ANSWER_PREFIX, is_sentence_query, reasoning_prompt
from flmm_lightning.inference.conversation import ChatInputError
from flmm_lightning.inference.pipeline import (
    GroundingRunner,
    ReadAnswer,
    Span,
    answer,
    fitting_prompt,
    image_sample,
    select_and_decode,
)
from flmm_lightning.selection import AnswerPhrase, phrases_from_scores


class EmptyAnswerError(ValueError):
    """The LMM generated no token after the answer prefix: a reasoning segmentation has nothing to merge."""


# Which answer tokens a reasoning segmentation merges into its one object: every generated token (F-LMM's
# ReasonSeg protocol), or the keyword selector's best phrase of the answer (all tokens when it marks none).
SEGMENT_TOKENS = ("all", "keywords")


@dataclass
class ReasonedSegmentation:
    """``Grounder.segment``: the LMM's short answer to a query and the mask of what it names."""

    query: str
    question: str  # the user turn the query became (``reasoning_prompt``)
    answer: str  # the answer prefix ("It is") and the generated text after it
    token_ids: list[int]  # the generated tokens (after the prefix)
    token_span: Span  # the generated tokens merged into the object
    mask: torch.Tensor  # bool [H, W], fine (SAM)
    coarse_mask: torch.Tensor  # bool [H, W]
    box: tuple[float, float, float, float] | None  # inclusive [x0, y0, x1, y1]; None when the mask is empty
    attention_map: torch.Tensor  # [C, h, w]
    image: Image.Image


@torch.no_grad()
def reason_and_segment(
    grounder: GroundingRunner,
    image: Image.Image,
    query: str,
    is_sentence: bool | None = None,
    tokens: str = "all",
    answer_prefix: str = ANSWER_PREFIX,
    max_new_tokens: int = 32,
    **generation: Any,
) -> ReasonedSegmentation:
    """F-LMM's reasoning segmentation (``Grounder.segment`` documents the arguments)."""
    if not isinstance(query, str) or not query.strip():
        raise ChatInputError(f"the query is empty: say what to segment, got {query!r}")
    if tokens not in SEGMENT_TOKENS:
        raise ChatInputError(f"tokens must be one of {SEGMENT_TOKENS}, got {tokens!r}")
    if tokens == "keywords" and not grounder.model.has_keyword_selector:
        raise ChatInputError("tokens='keywords': this checkpoint has no keyword selector; use tokens='all'")
    if is_sentence is None:
        is_sentence = is_sentence_query(query)
    question = reasoning_prompt(query, is_sentence)
    sample = image_sample(image)
    prompt, _ = fitting_prompt(grounder, sample, [], question, max_new_tokens + 8)
    prompt += answer_prefix
    read = answer(grounder, sample, prompt, max_new_tokens=max_new_tokens, **generation)
    if not read.token_ids:
        raise EmptyAnswerError(f"the LMM ended its answer right after {answer_prefix!r}: nothing to segment")

    def select(read: ReadAnswer) -> list[AnswerPhrase]:
        everything = AnswerPhrase(read.text, (0, len(read.text)), (0, len(read.token_ids)), None)
        if tokens == "all":
            return [everything]
        chosen = phrases_from_scores(read.text, read.offsets, read.keyword_scores(grounder))
        return [max(chosen, key=lambda phrase: phrase.score)] if chosen else [everything]

    grounded = select_and_decode(grounder, read, select)
    decoded = grounded.decoded
    return ReasonedSegmentation(
        query=query,
        question=question,
        answer=answer_prefix + read.text,
        token_ids=read.token_ids,
        token_span=grounded.chosen[0].token_span,
        mask=decoded.fine[0],
        coarse_mask=decoded.coarse[0],
        box=decoded.box(0),
        attention_map=decoded.maps[0],
        image=image,
    )
