"""Phrases of an answer: where each token lies in the text, and the phrases a selector's token scores mark.

Character spans are half-open ``(start, end)`` indices into the answer ``str`` (code points, so
``answer[start:end]`` is the phrase also for multi-byte text); token spans are half-open indices into the
answer's tokens.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

# The paper's token threshold for the keyword selector.
KEYWORD_THRESHOLD = 0.3
# Inside a word when between two letters: "t-shirt", "dog's".
_WORD_JOINERS = frozenset("'’-")

Span = tuple[int, int]


@dataclass(frozen=True)
class AnswerPhrase:
    """One phrase of an answer chosen for grounding."""

    text: str  # == answer[char_span[0]:char_span[1]]
    char_span: Span
    token_span: Span  # the answer tokens whose maps make the phrase's mask
    # Keyword selector: mean sigmoid score over the tokens of ``token_span``. None for phrases the LMM listed
    # or the caller named: nothing scored them, and a made-up 1.0 would read as certainty.
    score: float | None


def token_char_offsets(
    tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int], skip_special_tokens: bool = True
) -> tuple[str, list[Span]]:
    """The decoded text of ``token_ids`` and each token's character span in it.

    Works from decoded prefixes, so it holds for any tokenizer, for generated ids (which need not be what
    the tokenizer would produce for the text) and for tokens that carry part of a character (byte-level BPE,
    byte fallback): a prefix that does not decode to a prefix of the text ends inside a character, and the
    tokens up to the next prefix that does share that prefix's characters. Special tokens skipped in
    decoding get empty spans. Cost: one decode per token, quadratic in length (fine for answers).
    """
    ids = list(token_ids)
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    offsets: list[Span] = []
    start, pending = 0, 0  # end of the last clean boundary; tokens waiting for a clean boundary
    for i in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:i], skip_special_tokens=skip_special_tokens)
        pending += 1
        if not text.startswith(prefix):
            continue
        end = max(start, len(prefix))
        offsets += [(start, end)] * pending
        start, pending = end, 0
    return text, offsets


def _is_letter(char: str) -> bool:
    """A letter, digit or combining mark of a script that separates words with spaces. Wide characters (CJK
    ideographs, kana, Hangul) do not join: there, word boundaries need a segmenter, and token boundaries
    already fall between characters."""
    return unicodedata.category(char)[0] in "LNM" and unicodedata.east_asian_width(char) not in "WF"


def _is_word_char(text: str, i: int) -> bool:
    char = text[i]
    if char in _WORD_JOINERS:
        return 0 < i < len(text) - 1 and _is_letter(text[i - 1]) and _is_letter(text[i + 1])
    return _is_letter(char)


def _inside_word(text: str, i: int) -> bool:
    """Whether position ``i`` (between ``text[i - 1]`` and ``text[i]``) cuts a word."""
    return 0 < i < len(text) and _is_word_char(text, i - 1) and _is_word_char(text, i)


def _is_edge_junk(char: str) -> bool:
    """Spaces, punctuation and invisible characters, which a phrase neither starts nor ends with."""
    return char.isspace() or unicodedata.category(char)[0] in "PZC"


def strip_span(text: str, span: Span) -> Span:
    """``span`` without leading and trailing spaces and punctuation (empty when nothing else is in it)."""
    start, end = span
    while start < end and _is_edge_junk(text[start]):
        start += 1
    while end > start and _is_edge_junk(text[end - 1]):
        end -= 1
    return start, end


def snap_to_words(text: str, span: Span) -> Span:
    """``span`` stripped of surrounding spaces and punctuation, then widened to whole words."""
    start, end = strip_span(text, span)
    if start == end:
        return start, end
    while _inside_word(text, start):
        start -= 1
    while _inside_word(text, end):
        end += 1
    return start, end


def word_spans(text: str) -> list[Span]:
    """Every word of ``text``: maximal runs of word characters; a wide letter (CJK) is a word of its own."""
    spans: list[Span] = []
    i = 0
    while i < len(text):
        if _is_word_char(text, i):
            start = i
            while i < len(text) and _is_word_char(text, i):
                i += 1
            spans.append((start, i))
        else:
            if unicodedata.category(text[i])[0] in "LN":
                spans.append((i, i + 1))
            i += 1
    return spans


def score_runs(selected: torch.Tensor | Sequence[bool]) -> list[Span]:
    """Maximal runs of True in ``selected`` ``[T]``, as token spans."""
    flags = [bool(flag) for flag in selected]
    runs: list[Span] = []
    for i, flag in enumerate(flags):
        if flag and (i == 0 or not flags[i - 1]):
            runs.append((i, i))
        if flag:
            runs[-1] = (runs[-1][0], i + 1)
    return runs


def check_offsets(answer: str, offsets: Sequence[Span]) -> None:
    for i, (start, end) in enumerate(offsets):
        if not 0 <= start <= end <= len(answer):
            raise ValueError(
                f"token {i}: character span ({start}, {end}) outside the answer of {len(answer)}"
            )


def token_span_of(offsets: Sequence[Span], char_span: Span) -> Span:
    """The tokens whose characters overlap ``char_span``, as a token span."""
    start, end = char_span
    covering = [i for i, (s, e) in enumerate(offsets) if s < e and s < end and e > start]
    if not covering:
        raise ValueError(f"no token covers the characters {char_span}")
    return covering[0], covering[-1] + 1


def phrases_from_scores(
    answer: str,
    offsets: Sequence[Span],
    scores: torch.Tensor | Sequence[float],
    threshold: float = KEYWORD_THRESHOLD,
) -> list[AnswerPhrase]:
    """The phrases a keyword selector marks: maximal runs of tokens with ``score >= threshold``, each snapped
    to whole words (stripped of surrounding spaces and punctuation, widened to the words it cuts); runs that
    snap onto overlapping text become one phrase, and runs of only spaces or punctuation none.

    ``offsets``: ``[T]`` character span of each answer token (``token_char_offsets``, or a fast tokenizer's
    ``offset_mapping``); ``scores``: ``[T]`` sigmoid of the selector's logits. A phrase's score is the mean
    over the tokens of its token span (the tokens whose maps ground it), so it speaks for the whole phrase
    rather than its most confident token.
    """
    # On the host: the runs are walked token by token.
    values = torch.as_tensor(scores).detach().to("cpu", torch.float64).flatten()  # [T]
    if values.numel() != len(offsets):
        raise ValueError(f"{values.numel()} scores for {len(offsets)} tokens")
    check_offsets(answer, offsets)
    char_spans: list[Span] = []
    for first, last in score_runs(values >= threshold):
        run_start = min(s for s, _ in offsets[first:last])
        run_end = max(e for _, e in offsets[first:last])
        start, end = snap_to_words(answer, (run_start, run_end))
        if start == end:
            continue
        if char_spans and start < char_spans[-1][1]:
            start = min(start, char_spans[-1][0])
            end = max(end, char_spans.pop()[1])
        char_spans.append((start, end))
    phrases = []
    for start, end in char_spans:
        token_span = token_span_of(offsets, (start, end))
        score = float(values[token_span[0] : token_span[1]].mean())
        phrases.append(AnswerPhrase(answer[start:end], (start, end), token_span, score))
    return phrases


def locate_phrase(answer: str, phrase: str) -> Span | None:
    """Where ``phrase`` occurs in ``answer``: the first case-sensitive occurrence, else the first ignoring
    case; in each, an occurrence that cuts no word comes before one inside a word. None when absent."""
    pattern = re.escape(phrase)
    for flags in (0, re.IGNORECASE):
        matches = [m.span() for m in re.finditer(pattern, answer, flags)]
        whole = [(s, e) for s, e in matches if not _inside_word(answer, s) and not _inside_word(answer, e)]
        if whole or matches:
            return (whole or matches)[0]
    return None
