"""Token character offsets and phrases from selector scores, on the tiny assets' real tokenizers and on
hand-made scores."""

from __future__ import annotations

import pytest
import torch

from flmm_lightning.assets import build_llama_tokenizer, build_qwen2_5_vl_tokenizer
from flmm_lightning.selection import (
    AnswerPhrase,
    phrases_from_scores,
    snap_to_words,
    token_char_offsets,
    word_spans,
)

TEXTS = [
    "A brown dog 🐶 sits near the café table.",
    "我看到一只猫和一条狗，还有🎈和 a red kite。",
    "👨‍👩‍👧 family at the t-shirt stall",
]


@pytest.fixture(scope="module", params=["qwen", "llama"])
def tokenizer(request):
    return build_qwen2_5_vl_tokenizer() if request.param == "qwen" else build_llama_tokenizer("<image>")


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_agree_with_the_tokenizers_offset_mapping(tokenizer, text):
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    decoded, offsets = token_char_offsets(tokenizer, encoded["input_ids"])
    assert decoded == text
    assert len(offsets) == len(encoded["input_ids"])
    # Contiguous and covering: each token starts where the previous ended, or shares its span (the tokens
    # of one multi-byte character).
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    for (start, end), (next_start, next_end) in zip(offsets, offsets[1:], strict=False):
        assert next_start == end or (next_start, next_end) == (start, end)
    # The tokenizer's own account differs only by where a token's leading space or shared character goes,
    # and by LLaMA's prepended "▁", which maps onto the first character there but adds none to the text.
    for (start, end), (mapped_start, mapped_end) in zip(offsets, encoded["offset_mapping"], strict=True):
        if start < end:
            assert text[start:end].strip() == text[mapped_start:mapped_end].strip()


@pytest.mark.parametrize("text", TEXTS)
def test_phrases_index_the_answer_whichever_offsets(tokenizer, text):
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    decoded, offsets = token_char_offsets(tokenizer, encoded["input_ids"])
    generator = torch.Generator().manual_seed(len(text))
    scores = torch.rand(len(offsets), generator=generator)  # [T]
    phrases = phrases_from_scores(decoded, offsets, scores)
    # Token spans may differ by LLaMA's prepended "▁" (empty here, the first character there).
    from_mapping = phrases_from_scores(text, encoded["offset_mapping"], scores)
    assert [(p.text, p.char_span) for p in phrases] == [(p.text, p.char_span) for p in from_mapping]
    assert phrases
    for phrase in phrases:
        start, end = phrase.char_span
        assert text[start:end] == phrase.text
        assert snap_to_words(text, phrase.char_span) == phrase.char_span
        # The token span is exactly the tokens overlapping the phrase's characters.
        overlapping = [i for i, (s, e) in enumerate(offsets) if s < e and s < end and e > start]
        assert phrase.token_span == (overlapping[0], overlapping[-1] + 1)
        assert min(offsets[overlapping[0]]) <= start and end <= max(offsets[overlapping[-1]])


def test_offsets_of_generated_ids_with_special_tokens_and_a_cut_character():
    tokenizer = build_qwen2_5_vl_tokenizer()
    # Generated ids need not be the tokenizer's own segmentation: spell "dog" letter by letter.
    letters = [tokenizer.convert_tokens_to_ids(letter) for letter in "dog"]
    emoji = tokenizer.encode(" 🐶", add_special_tokens=False)
    assert len(emoji) > 1  # a byte-level character over several tokens
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text, offsets = token_char_offsets(tokenizer, [*letters, *emoji, end_of_turn])
    assert text == "dog 🐶"
    assert offsets == [(0, 1), (1, 2), (2, 3), *[(3, 5)] * len(emoji), (5, 5)]
    # Generation stopped inside the emoji: the partial bytes decode to a replacement character.
    text, offsets = token_char_offsets(tokenizer, [*letters, *emoji[:-1]])
    assert text.startswith("dog ") and text[-1] == "\ufffd"
    assert offsets[-1][1] == len(text)


# Hand-made tokens of "Two dogs, a red ball and the sky." and the phrases their scores must give.
HAND_TEXT = "Two dogs, a red ball and the sky."
HAND_TOKENS = ["Two", " do", "gs", ",", " a", " red", " ball", " and", " the", " sky", "."]


def _hand_offsets(tokens: list[str]) -> list[tuple[int, int]]:
    offsets, start = [], 0
    for token in tokens:
        offsets.append((start, start + len(token)))
        start += len(token)
    return offsets


def test_phrases_from_hand_made_scores():
    offsets = _hand_offsets(HAND_TOKENS)
    assert "".join(HAND_TOKENS) == HAND_TEXT
    scores = [0.1, 0.8, 0.2, 0.9, 0.5, 0.6, 0.9, 0.29, 0.3, 0.7, 0.95]
    phrases = phrases_from_scores(HAND_TEXT, offsets, scores)
    assert phrases == [
        # " do" alone is above the threshold: widened to the word it cuts, so "gs" joins the token span.
        AnswerPhrase("dogs", (4, 8), (1, 3), pytest.approx((0.8 + 0.2) / 2)),
        # "," alone is above the threshold too, but a run of punctuation is no phrase.
        AnswerPhrase("a red ball", (10, 20), (4, 7), pytest.approx((0.5 + 0.6 + 0.9) / 3)),
        # " and" is just below 0.3; " the" at exactly 0.3 is in; the final "." is stripped with its token.
        AnswerPhrase("the sky", (25, 32), (8, 10), pytest.approx((0.3 + 0.7) / 2)),
    ]
    # The selector's own output (a tensor with a graph) reads the same.
    assert phrases_from_scores(HAND_TEXT, offsets, torch.tensor(scores, requires_grad=True)) == phrases
    assert phrases_from_scores(HAND_TEXT, offsets, [0.0] * len(offsets)) == []
    assert phrases_from_scores(HAND_TEXT, offsets, [1.0] * len(offsets)) == [
        AnswerPhrase(HAND_TEXT[:-1], (0, 32), (0, 10), 1.0)
    ]


def test_runs_snapping_into_one_word_are_one_phrase():
    tokens = ["On", " the", " gr", "a", "ss", "."]
    text = "".join(tokens)
    phrases = phrases_from_scores(text, _hand_offsets(tokens), [0.0, 0.0, 0.9, 0.1, 0.8, 0.0])
    assert phrases == [AnswerPhrase("grass", (7, 12), (2, 5), pytest.approx((0.9 + 0.1 + 0.8) / 3))]


def test_wide_characters_are_words_of_their_own():
    text = "我看到一只猫和狗"
    offsets = [(i, i + 1) for i in range(len(text))]
    scores = [1.0 if char in "猫狗" else 0.0 for char in text]
    phrases = phrases_from_scores(text, offsets, scores)
    assert [(p.text, p.char_span) for p in phrases] == [("猫", (5, 6)), ("狗", (7, 8))]
    assert word_spans("a 猫, t-shirt's 🐶!") == [(0, 1), (2, 3), (5, 14)]


def test_bad_scores_or_offsets_are_refused():
    offsets = _hand_offsets(HAND_TOKENS)
    with pytest.raises(ValueError, match="10 scores for 11 tokens"):
        phrases_from_scores(HAND_TEXT, offsets, [0.5] * 10)
    with pytest.raises(ValueError, match="outside the answer"):
        phrases_from_scores(HAND_TEXT[:5], offsets, [0.5] * 11)
