"""Grounded conversation: the frozen LMM answers a question about an image with its own chat template, and
the phrases of its answer that name things in the image are segmented.

One turn: ``generate`` writes the answer; one teacher-forced forward over the same prompt plus the answer's
token ids (as generated, never re-tokenised) reads every answer token through the training capture path
(``HFGroundingAdapter.read``); the phrases are chosen (keyword selector scores, the LMM's own list, or the
caller's); each phrase's tokens are merged into one object and decoded by the U-Net and SAM as in training.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from torchvision.ops import masks_to_boxes

from flmm_lightning.boundaries import NOT_GROUNDED, ContextOverflowError, GroundingSample, PromptBuilder
from flmm_lightning.core import FLMM
from flmm_lightning.data.batch import EncodedDataset, EncodedSample, GroundingBatch, GroundingCollate
from flmm_lightning.data.images import sam_input_image
from flmm_lightning.heads.sam_refiner import binarize_coarse
from flmm_lightning.lmm.hf import DEFAULT_MAX_NEW_TOKENS
from flmm_lightning.lmm.readout import TokenReadout
from flmm_lightning.masks import mask_scores
from flmm_lightning.selection import (
    KEYWORD_THRESHOLD,
    LMM_SELECTOR_PROMPT,
    AnswerPhrase,
    locate_given_phrases,
    parse_lmm_phrases,
    phrases_from_scores,
    token_char_offsets,
)

# How the phrases to ground are chosen: the keyword selector's token scores, the LMM asked for a list of
# them, or the caller's own.
SELECTORS = ("keywords", "lmm", "given")

Span = tuple[int, int]
Turn = tuple[str, str]


class GroundingRunner:
    """The model core with the input encoding of its checkpoint: what a chat turn and a reasoning segmentation
    run on, on the device of the model's weights. ``grounder.Grounder`` is one (loaded from a checkpoint); the
    Lightning module's evaluation of reasoning splits builds one around its own core."""

    def __init__(self, model: FLMM, prompt_builder: PromptBuilder, sam_image_size: int) -> None:
        self.model = model
        self.encode = EncodedDataset([], prompt_builder, sam_image_size)
        self.collate = GroundingCollate(prompt_builder)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class ChatInputError(ValueError):
    """A question, history or selector choice that a turn cannot take (the message says which and why)."""


@dataclass
class GroundedPhrase:
    """One phrase of an answer with what it was grounded to, on the image of its turn."""

    text: str  # == answer[char_span[0]:char_span[1]]
    char_span: Span  # in the answer text (code points)
    token_span: Span  # the answer tokens whose attention made the mask
    score: float | None  # keyword selector: mean token score; None for phrases the LMM or the caller named
    mask: torch.Tensor  # bool [H, W], the fine (SAM) mask at the image's size
    coarse_mask: torch.Tensor  # bool [H, W], the U-Net's mask resized to the image
    box: tuple[float, float, float, float] | None  # inclusive [x0, y0, x1, y1] of ``mask``; None when empty
    attention_map: torch.Tensor  # [C, h, w], the answer tokens' merged attention the masks came from
    mask_score: float  # the mean SAM probability over ``mask``'s pixels (``masks.mask_scores``); 0 when empty


@dataclass
class GroundedAnswer:
    """One turn: the question, the LMM's answer and the grounded phrases of the answer."""

    question: str
    answer: str
    token_ids: list[int]  # the answer as generated
    phrases: list[GroundedPhrase]
    selector: str  # how the phrases were chosen (one of ``SELECTORS``)
    image: Image.Image  # the image the masks belong to (EXIF orientation applied)
    dropped_turns: int = 0  # earlier turns left out of the prompt so that it fit the LMM's context

    @property
    def masks(self) -> torch.Tensor:
        """bool ``[n, H, W]``: every phrase's fine mask."""
        if not self.phrases:
            return torch.zeros(0, self.image.height, self.image.width, dtype=torch.bool)
        return torch.stack([phrase.mask for phrase in self.phrases])


class Chatter(Protocol):
    """What a ``Conversation`` talks to: ``grounder.Grounder``."""

    def chat(
        self, image: Image.Image | str, question: str, history: Sequence[GroundedAnswer], **options: Any
    ) -> GroundedAnswer: ...


@dataclass
class Conversation:
    """A multi-turn conversation about one image: each ``ask`` sends the earlier turns as history, and each
    turn keeps its own groundings."""

    grounder: Chatter
    image: Image.Image | str
    turns: list[GroundedAnswer] = field(default_factory=list)

    def ask(self, question: str, **options: Any) -> GroundedAnswer:
        """``Grounder.chat`` with this conversation's image and turns; the turn is appended."""
        turn = self.grounder.chat(self.image, question, history=self.turns, **options)
        self.image = turn.image  # loaded once
        self.turns.append(turn)
        return turn


def check_question(question: object) -> None:
    """Refuses a question that is not text or only blanks (``ChatInputError``)."""
    if not isinstance(question, str) or not question.strip():
        raise ChatInputError(f"the question is empty: ask something about the image, got {question!r}")


def turn_texts(history: Sequence[GroundedAnswer | Turn] | None) -> list[Turn]:
    """The ``(question, answer)`` texts of earlier turns (``GroundedAnswer``s or pairs), checked."""
    turns = []
    for index, turn in enumerate(history or []):
        if isinstance(turn, GroundedAnswer):
            turns.append((turn.question, turn.answer))
        elif isinstance(turn, tuple | list) and len(turn) == 2 and all(isinstance(t, str) for t in turn):
            turns.append((turn[0], turn[1]))
        else:
            raise ChatInputError(
                f"history[{index}] is a {type(turn).__name__}: give GroundedAnswer turns or "
                "(question, answer) pairs of strings"
            )
    return turns


def _choose_selector(selector: str | None, phrases: Sequence[str] | None, has_keywords: bool) -> str:
    if selector is None:
        selector = "given" if phrases is not None else "keywords" if has_keywords else "lmm"
    if selector not in SELECTORS:
        raise ChatInputError(f"selector must be one of {SELECTORS}, got {selector!r}")
    if selector == "keywords" and not has_keywords:
        raise ChatInputError(
            "selector='keywords': this checkpoint has no keyword selector (it was trained with "
            "model.lmm.keyword_selector=false); chat with selector='lmm' or selector='given'"
        )
    if (selector == "given") != (phrases is not None):
        raise ChatInputError("phrases=[...] goes with selector='given', and selector='given' needs phrases")
    return selector


def fitting_prompt(
    grounder: GroundingRunner,
    sample: GroundingSample,
    turns: list[Turn],
    question: str,
    room: int,
    kept: int = 0,
) -> tuple[str, int]:
    """The conversation prompt with as many of the latest ``turns`` as leave ``room`` tokens of the LMM's
    context for the answer, and how many of the oldest turns were left out (warned). The last ``kept``
    turns and the question are never left out."""
    builder = grounder.encode.prompt_builder
    context = builder.context_length
    for dropped in range(len(turns) - kept + 1):
        prompt = builder.conversation_prompt(turns[dropped:], question)
        tokens = builder.conversation_tokens(sample, prompt)
        if tokens + room <= context:
            if dropped:
                warnings.warn(
                    f"the conversation exceeds the LMM's context of {context} tokens: its oldest {dropped} "
                    f"of {len(turns)} earlier turns are left out of the prompt",
                    stacklevel=3,
                )
            return prompt, dropped
    raise ContextOverflowError(
        f"the question with the image (and the answer it asks about) takes {tokens} tokens; with "
        f"max_new_tokens={room} for the reply that exceeds the LMM's context of {context} tokens: ask a "
        "shorter question or lower max_new_tokens"
    )


def encode_turn(
    grounder: GroundingRunner, sample: GroundingSample, prompt: str, answer_ids: Sequence[int]
) -> GroundingBatch:
    """The batch of one turn on the grounder's device: ``prompt`` with the image, then ``answer_ids``."""
    builder = grounder.encode.prompt_builder
    encoded = EncodedSample(
        sample=sample,
        prompt=builder.conversation_inputs(sample, prompt, answer_ids),
        sam_image=sam_input_image(sample.image, grounder.encode.sam_image_size),
    )
    return move_data_to_device(grounder.collate([encoded]), grounder.device)


def _lmm_phrases(
    grounder: GroundingRunner,
    sample: GroundingSample,
    turns: list[Turn],
    answered: Turn,
    answer: str,
    offsets: list[Span],
    max_new_tokens: int,
) -> list[AnswerPhrase]:
    """Asks the LMM, as the next user turn, which phrases of its answer name visible things (greedy)."""
    prompt, _ = fitting_prompt(grounder, sample, [*turns, answered], LMM_SELECTOR_PROMPT, max_new_tokens, 1)
    batch = encode_turn(grounder, sample, prompt, [])
    reply_ids = grounder.model.lmm.generate(batch.lmm, max_new_tokens=max_new_tokens)
    reply = grounder.encode.prompt_builder.processor.tokenizer.decode(reply_ids, skip_special_tokens=True)
    return parse_lmm_phrases(reply, answer, offsets)


def image_sample(image: Image.Image) -> GroundingSample:
    """The image as a sample without objects: what the prompt builder and SAM's resize take."""
    return GroundingSample(
        image=image,
        phrases=[],
        masks=torch.zeros(0, image.height, image.width, dtype=torch.bool),
        is_thing=torch.zeros(0, dtype=torch.bool),
        is_plural=torch.zeros(0, dtype=torch.bool),
        image_id="chat",
        file_name=getattr(image, "filename", "") or "chat",
        object_ids=[],
    )


@dataclass
class DecodedSpans:
    """The masks and merged attention of objects given as answer-token spans."""

    fine: torch.Tensor  # bool [n, H, W]
    coarse: torch.Tensor  # bool [n, H, W]
    maps: torch.Tensor  # [n, C, h, w]
    scores: torch.Tensor  # float [n], ``masks.mask_scores`` of ``fine``

    def box(self, k: int) -> tuple[float, float, float, float] | None:
        mask = self.fine[k : k + 1]
        return tuple(float(v) for v in masks_to_boxes(mask)[0]) if mask.any() else None


def decode_token_spans(
    grounder: GroundingRunner, batch: GroundingBatch, readout: TokenReadout, spans: list[Span]
) -> DecodedSpans:
    """Masks of the objects whose answer tokens are ``spans`` (token spans of the utterance): each span's
    tokens marked as one object (replacing the batch's own marks), merged and decoded by the U-Net and SAM
    as in training."""
    start = int(batch.lmm.utterance_start[0])
    batch.lmm.mask_ids[0].fill_(NOT_GROUNDED)
    for k, (first, last) in enumerate(spans):
        batch.lmm.mask_ids[0, start + first : start + last] = k
    features = grounder.model.lmm.features(batch.lmm, readout)
    prediction = grounder.model.decode(batch, features)[0]
    size = (batch.samples[0].image.height, batch.samples[0].image.width)
    fine_logits = prediction.fine_logits.cpu()  # [n, H, W]
    return DecodedSpans(
        fine=fine_logits > 0,
        coarse=binarize_coarse(prediction.coarse_logits, size).cpu(),
        maps=prediction.features.attention_maps.cpu(),
        scores=mask_scores(fine_logits, fine_logits > 0),
    )


@torch.no_grad()
def answer_and_ground(
    grounder: GroundingRunner,
    image: Image.Image,
    question: str,
    history: Sequence[GroundedAnswer | Turn] | None = None,
    selector: str | None = None,
    threshold: float = KEYWORD_THRESHOLD,
    phrases: Sequence[str] | None = None,
    **generation: Any,
) -> GroundedAnswer:
    """One grounded turn (``Grounder.chat`` documents the arguments); ``image`` is an RGB PIL image as
    viewers show it."""
    check_question(question)
    lmm = grounder.model.lmm
    selector = _choose_selector(selector, phrases, getattr(lmm, "keyword_selector", None) is not None)
    turns = turn_texts(history)
    sample = image_sample(image)
    max_new_tokens = int(generation.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    prompt, dropped = fitting_prompt(grounder, sample, turns, question, max_new_tokens)
    answer_ids = lmm.generate(encode_turn(grounder, sample, prompt, []).lmm, **generation)
    tokenizer = grounder.encode.prompt_builder.processor.tokenizer
    answer, offsets = token_char_offsets(tokenizer, answer_ids)
    result = GroundedAnswer(question, answer, answer_ids, [], selector, image, dropped)
    if not answer_ids:
        return result

    batch = encode_turn(grounder, sample, prompt, answer_ids)
    readout = lmm.read(batch.lmm, every_utterance_token=True)
    if selector == "keywords":
        scores = lmm.selector_logits(readout)[0].float().sigmoid()  # [T_answer]
        chosen = phrases_from_scores(answer, offsets, scores, threshold)
    elif selector == "lmm":
        answered = (question, answer)
        chosen = _lmm_phrases(grounder, sample, turns[dropped:], answered, answer, offsets, max_new_tokens)
    else:
        try:
            chosen = locate_given_phrases(list(phrases), answer, offsets)
        except ValueError as error:
            raise ChatInputError(f"phrases: {error}") from error
    if not chosen:
        return result

    decoded = decode_token_spans(grounder, batch, readout, [phrase.token_span for phrase in chosen])
    for k, phrase in enumerate(chosen):
        result.phrases.append(
            GroundedPhrase(
                text=phrase.text,
                char_span=phrase.char_span,
                token_span=phrase.token_span,
                score=phrase.score,
                mask=decoded.fine[k],
                coarse_mask=decoded.coarse[k],
                box=decoded.box(k),
                attention_map=decoded.maps[k],
                mask_score=float(decoded.scores[k]),
            )
        )
    return result
