"""Phrases named in words rather than scored: listed by the frozen LMM (``selector=lmm``) or by the caller
(``selector=given``), each located in the answer text."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence

from flmm_lightning.selection.phrases import AnswerPhrase, Span, check_offsets, locate_phrase, token_span_of

# The follow-up user turn, after the LMM's answer, that asks it for the phrases to ground.
LMM_SELECTOR_PROMPT = (
    "List the phrases of your previous answer that name things visible in the image. Reply with only a "
    'JSON list of strings, each copied exactly from your answer, for example: ["a red car", "the old tree"]'
)
# A reply wrapped in one Markdown code fence, with or without a language tag.
_FENCE = re.compile(r"```[A-Za-z]*[ \t]*\n?(.*?)```", re.DOTALL)


class SelectorReplyWarning(UserWarning):
    """Part of the LMM's phrase list could not be used; the message says which and why."""


def _drop(reason: str) -> None:
    warnings.warn(f"selector=lmm: {reason}; dropped", SelectorReplyWarning, stacklevel=3)


def _quote(reply: str, limit: int = 200) -> str:
    """The reply as a warning quotes it: its repr, cut after ``limit`` characters."""
    return repr(reply) if len(reply) <= limit else f"{reply[:limit]!r}... ({len(reply)} characters)"


def _reply_json(reply: str) -> str | None:
    """The JSON text of the reply: all of it, or the inside of its only code fence; None when there are
    several fences."""
    fences = _FENCE.findall(reply)
    if len(fences) > 1:
        return None
    return (fences[0] if fences else reply).strip()


def parse_lmm_phrases(reply: str, answer: str, offsets: Sequence[Span]) -> list[AnswerPhrase]:
    """The phrases of ``answer`` the LMM listed in ``reply`` (to ``LMM_SELECTOR_PROMPT``), in answer order.

    The reply must be a JSON list of strings, bare or inside one Markdown code fence (```json ... ```, text
    around the fence ignored). Each string, stripped of surrounding spaces, is located in the answer by
    ``locate_phrase`` (case-sensitive first, then ignoring case; the phrase's text is then the answer's own).
    Everything unusable is dropped with a ``SelectorReplyWarning`` naming it and the reason: a reply that is
    not JSON or not a list (all of it), a non-string or empty item, a phrase not in the answer, a duplicate
    (same text, or the same place in the answer). Never raises on the reply's content.

    ``offsets``: ``[T]`` character span of each answer token, for the phrases' token spans. Scores are None.
    """
    check_offsets(answer, offsets)
    text = _reply_json(reply)
    if text is None:
        _drop(f"the reply {_quote(reply)} has several code fences")
        return []
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        _drop(f"the reply {_quote(reply)} is not JSON ({error.msg})")
        return []
    except RecursionError:
        _drop(f"the reply {_quote(reply)} is not JSON (nested too deeply)")
        return []
    if not isinstance(items, list):
        _drop(f"the reply {_quote(reply)} is a JSON {type(items).__name__}, not a list of strings")
        return []
    seen: dict[Span, str] = {}
    for item in items:
        if not isinstance(item, str):
            _drop(f"item {item!r} is not a string")
            continue
        phrase = item.strip()
        if not phrase:
            _drop(f"item {item!r} is empty")
            continue
        span = locate_phrase(answer, phrase)
        if span is None:
            _drop(f"phrase {phrase!r} is not in the answer")
            continue
        if span in seen:
            _drop(f"phrase {phrase!r} repeats {seen[span]!r}")
            continue
        seen[span] = phrase
    return [
        AnswerPhrase(answer[start:end], (start, end), token_span_of(offsets, (start, end)), None)
        for start, end in sorted(seen)
    ]


def locate_given_phrases(phrases: Sequence[str], answer: str, offsets: Sequence[Span]) -> list[AnswerPhrase]:
    """The caller's ``phrases`` located in ``answer`` (``locate_phrase``), in the caller's order.

    Raises ``ValueError`` naming the phrase when one is empty, named twice or not in the answer.
    ``offsets``: ``[T]`` character span of each answer token. Scores are None.
    """
    check_offsets(answer, offsets)
    located = []
    for phrase in phrases:
        if not phrase.strip():
            raise ValueError(f"given phrase {phrase!r} is empty")
        if phrases.count(phrase) > 1:
            raise ValueError(f"given phrase {phrase!r} is named {phrases.count(phrase)} times")
        span = locate_phrase(answer, phrase.strip())
        if span is None:
            raise ValueError(f"given phrase {phrase!r} does not occur in the answer {answer!r}")
        start, end = span
        located.append(AnswerPhrase(answer[start:end], span, token_span_of(offsets, span), None))
    return located
