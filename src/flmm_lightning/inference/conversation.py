"""Grounded conversation: the frozen LMM answers a question about an image with its own chat template, and
the phrases of its answer that name things in the image are segmented.

One turn is one run of the pipeline (``pipeline.ground_answer``): the LMM answers, the answer is read
teacher-forced, the phrases are chosen (keyword selector scores, the LMM's own list, or the caller's), and
each phrase's tokens are merged into one object and decoded by the U-Net and SAM as in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image

from flmm_lightning.boundaries import GroundingSample
from flmm_lightning.inference.pipeline import (
    GroundingRunner,
    ReadAnswer,
    Span,
    Turn,
    fitting_prompt,
    generate,
    ground_answer,
    image_sample,
)
from flmm_lightning.lmm.hf import DEFAULT_MAX_NEW_TOKENS
from flmm_lightning.selection import (
    KEYWORD_THRESHOLD,
    LMM_SELECTOR_PROMPT,
    AnswerPhrase,
    locate_given_phrases,
    parse_lmm_phrases,
    phrases_from_scores,
)

# How the phrases to ground are chosen: the keyword selector's token scores, the LMM asked for a list of
# them, or the caller's own.
SELECTORS = ("keywords", "lmm", "given")


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
    # the mean SAM probability over ``mask``'s pixels (``common.masks.mask_scores``); 0 when empty
    mask_score: float


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
    reply_ids = generate(grounder, sample, prompt, max_new_tokens=max_new_tokens)
    reply = grounder.tokenizer.decode(reply_ids, skip_special_tokens=True)
    return parse_lmm_phrases(reply, answer, offsets)


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
    has_keywords = grounder.model.has_keyword_selector
    selector = _choose_selector(selector, phrases, has_keywords)
    turns = turn_texts(history)
    sample = image_sample(image)
    max_new_tokens = int(generation.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    prompt, dropped = fitting_prompt(grounder, sample, turns, question, max_new_tokens)

    def select(read: ReadAnswer) -> list[AnswerPhrase]:
        if selector == "keywords":
            return phrases_from_scores(read.text, read.offsets, read.keyword_scores(grounder), threshold)
        if selector == "lmm":
            answered = (question, read.text)
            return _lmm_phrases(
                grounder, sample, turns[dropped:], answered, read.text, read.offsets, max_new_tokens
            )
        try:
            return locate_given_phrases(list(phrases), read.text, read.offsets)
        except ValueError as error:
            raise ChatInputError(f"phrases: {error}") from error

    grounded = ground_answer(grounder, sample, prompt, select, **generation)
    read = grounded.answer
    result = GroundedAnswer(question, read.text, read.token_ids, [], selector, image, dropped)
    decoded = grounded.decoded
    for k, phrase in enumerate(grounded.chosen):
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
