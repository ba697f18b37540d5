"""Phrases listed by the LMM (parsed strictly, never crashing a turn) and phrases named by the caller."""

from __future__ import annotations

import warnings

import pytest

from flmm_lightning.assets import build_qwen2_5_vl_tokenizer
from flmm_lightning.selection import (
    LMM_SELECTOR_PROMPT,
    AnswerPhrase,
    SelectorReplyWarning,
    locate_given_phrases,
    parse_lmm_phrases,
    token_char_offsets,
)

ANSWER = "The dog chases a concatenated cat and a red ball near 猫🐶 in the park."


@pytest.fixture(scope="module")
def offsets():
    tokenizer = build_qwen2_5_vl_tokenizer()
    text, offsets = token_char_offsets(tokenizer, tokenizer.encode(ANSWER, add_special_tokens=False))
    assert text == ANSWER
    return offsets


def _parse(reply: str, offsets) -> tuple[list[AnswerPhrase], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        phrases = parse_lmm_phrases(reply, ANSWER, offsets)
    assert all(issubclass(w.category, SelectorReplyWarning) for w in caught)
    return phrases, [str(w.message) for w in caught]


def test_prompt_asks_for_a_json_list():
    assert "JSON list of strings" in LMM_SELECTOR_PROMPT


@pytest.mark.parametrize(
    "reply",
    [
        '["a red ball", "The dog", "猫🐶"]',
        'Sure! Here they are:\n```json\n["a red ball", "The dog", "猫🐶"]\n```\nHope this helps.',
        '```\n[" a red ball ", "The dog", "猫🐶"]```',
    ],
    ids=["bare", "json-fence", "plain-fence"],
)
def test_listed_phrases_are_located_in_answer_order(reply, offsets):
    phrases, messages = _parse(reply, offsets)
    assert messages == []
    assert [p.text for p in phrases] == ["The dog", "a red ball", "猫🐶"]
    for phrase in phrases:
        start, end = phrase.char_span
        assert ANSWER[start:end] == phrase.text and phrase.score is None
        first, last = phrase.token_span
        assert (
            offsets[first][0] <= start < offsets[first][1]
            and offsets[last - 1][0] < end <= offsets[last - 1][1]
        )


def test_case_and_whole_words():
    offsets = [(i, i + 1) for i in range(len(ANSWER))]
    phrases, messages = _parse('["the dog", "cat"]', offsets)
    assert messages == []
    # Case-sensitive first, then ignoring case (the text is the answer's own); a whole word before an
    # occurrence inside a word ("concatenated").
    cat = ANSWER.index(" cat ") + 1
    assert [(p.text, p.char_span) for p in phrases] == [("The dog", (0, 7)), ("cat", (cat, cat + 3))]


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("The dog and the ball.", "is not JSON"),
        ('{"phrases": ["The dog"]}', "is a JSON dict, not a list of strings"),
        ('"The dog"', "is a JSON str, not a list of strings"),
        ('```json\n["The dog"]\n```\n```json\n["cat"]\n```', "has several code fences"),
        ("", "is not JSON"),
        ("[", "is not JSON"),
        ("```json\n```", "is not JSON"),
        ("[" * 5000 + "]" * 5000, "is not JSON (nested too deeply)"),
    ],
)
def test_unusable_replies_give_no_phrase_and_say_why(reply, reason, offsets):
    phrases, messages = _parse(reply, offsets)
    assert phrases == []
    assert len(messages) == 1 and reason in messages[0] and messages[0].startswith("selector=lmm:")


def test_unusable_items_are_dropped_one_by_one(offsets):
    reply = '["The dog", 3, null, ["cat"], "  ", "a unicorn", "the dog", "The dog", "the park"]'
    phrases, messages = _parse(reply, offsets)
    assert [p.text for p in phrases] == ["The dog", "the park"]
    assert messages == [
        "selector=lmm: item 3 is not a string; dropped",
        "selector=lmm: item None is not a string; dropped",
        "selector=lmm: item ['cat'] is not a string; dropped",
        "selector=lmm: item '  ' is empty; dropped",
        "selector=lmm: phrase 'a unicorn' is not in the answer; dropped",
        "selector=lmm: phrase 'the dog' repeats 'The dog'; dropped",
        "selector=lmm: phrase 'The dog' repeats 'The dog'; dropped",
    ]


@pytest.mark.parametrize(
    "reply",
    [
        "null",
        "[[[]]]",
        "```",
        "``````",
        "[1e999]",
        '["\\ud800"]',
        "\x00\xff",
        '[""]',
        '[{"text": "The dog"}]',
    ],
)
def test_malformed_replies_never_raise(reply, offsets):
    phrases, _ = _parse(reply, offsets)
    assert phrases == []


def test_given_phrases_keep_the_callers_order(offsets):
    phrases = locate_given_phrases(["the park", "猫", "a red ball"], ANSWER, offsets)
    assert [(p.text, p.score) for p in phrases] == [("the park", None), ("猫", None), ("a red ball", None)]
    for phrase in phrases:
        assert ANSWER[phrase.char_span[0] : phrase.char_span[1]] == phrase.text


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["The dog", "a unicorn"], "given phrase 'a unicorn' does not occur in the answer"),
        (["The dog", " "], "given phrase ' ' is empty"),
        (["cat", "cat"], "given phrase 'cat' is named 2 times"),
    ],
)
def test_given_phrases_must_occur(given, message, offsets):
    with pytest.raises(ValueError, match=message):
        locate_given_phrases(given, ANSWER, offsets)
