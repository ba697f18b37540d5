"""Reasoning segmentation (F-LMM's ReasonSeg protocol) on the grounded-conversation path: the frozen LMM
answers a query briefly after a forced prefix ("It is"), and the generated tokens' attention is merged into
one object and decoded by the U-Net and SAM as in training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from flmm_lightning.data.reasonseg import ANSWER_PREFIX, is_sentence_query, reasoning_prompt
from flmm_lightning.inference.conversation import (
    ChatInputError,
    GroundingRunner,
    Span,
    decode_token_spans,
    encode_turn,
    fitting_prompt,
    image_sample,
)
from flmm_lightning.selection import phrases_from_scores, token_char_offsets


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
    lmm = grounder.model.lmm
    if tokens == "keywords" and getattr(lmm, "keyword_selector", None) is None:
        raise ChatInputError("tokens='keywords': this checkpoint has no keyword selector; use tokens='all'")
    if is_sentence is None:
        is_sentence = is_sentence_query(query)
    question = reasoning_prompt(query, is_sentence)
    sample = image_sample(image)
    prompt, _ = fitting_prompt(grounder, sample, [], question, max_new_tokens + 8)
    prompt += answer_prefix
    answer_ids = lmm.generate(
        encode_turn(grounder, sample, prompt, []).lmm, max_new_tokens=max_new_tokens, **generation
    )
    tokenizer = grounder.encode.prompt_builder.processor.tokenizer
    text, offsets = token_char_offsets(tokenizer, answer_ids)
    if not answer_ids:
        raise EmptyAnswerError(f"the LMM ended its answer right after {answer_prefix!r}: nothing to segment")
    batch = encode_turn(grounder, sample, prompt, answer_ids)
    readout = lmm.read(batch.lmm, every_utterance_token=True)
    span = (0, len(answer_ids))
    if tokens == "keywords":
        scores = lmm.selector_logits(readout)[0].float().sigmoid()  # [T_answer]
        chosen = phrases_from_scores(text, offsets, scores)
        if chosen:
            span = max(chosen, key=lambda phrase: phrase.score).token_span
    decoded = decode_token_spans(grounder, batch, readout, [span])
    return ReasonedSegmentation(
        query=query,
        question=question,
        answer=answer_prefix + text,
        token_ids=answer_ids,
        token_span=span,
        mask=decoded.fine[0],
        coarse_mask=decoded.coarse[0],
        box=decoded.box(0),
        attention_map=decoded.maps[0],
        image=image,
    )
