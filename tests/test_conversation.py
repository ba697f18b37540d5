"""Grounded conversation on the tiny offline models: the LMM's answer, its phrases and their masks, the
attention they come from, multi-turn history and every bad input of a turn."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from samples import make_sample

from flmm_lightning.boundaries import ContextOverflowError
from flmm_lightning.inference.conversation import ChatInputError, Conversation, GroundedAnswer
from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.runs.build import build_module, build_prompt_builder
from flmm_lightning.selection import SelectorReplyWarning

IMAGE = make_sample(100, 150, [], 7).image  # not square: masks must come back 100 x 150
QUESTION = "What is in the image?"
SHORT = {"max_new_tokens": 16}


pytestmark = pytest.mark.usefixtures("pinned_threads")


@pytest.fixture(scope="module")
def grounder(tiny_config) -> Grounder:
    """The demo model (keyword selector included), untrained, fp32 on the CPU."""
    torch.manual_seed(0)
    prompt_builder = build_prompt_builder(tiny_config)
    return Grounder(build_module(tiny_config).model, prompt_builder, tiny_config.sam.image_size, device="cpu")


@pytest.fixture(scope="module")
def first(grounder: Grounder) -> GroundedAnswer:
    # Threshold 0: every answer token is selected, so the answer grounds at least one phrase.
    return grounder.chat(IMAGE, QUESTION, threshold=0.0, **SHORT)


def check_phrases(answer: GroundedAnswer) -> None:
    for phrase in answer.phrases:
        start, end = phrase.char_span
        assert answer.answer[start:end] == phrase.text and phrase.text.strip() == phrase.text
        assert phrase.mask.shape == phrase.coarse_mask.shape == (IMAGE.height, IMAGE.width)
        assert phrase.mask.dtype == torch.bool
        if phrase.mask.any():
            rows, cols = phrase.mask.nonzero().unbind(1)
            assert phrase.box == (float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max()))
        else:
            assert phrase.box is None


def test_greedy_chat_is_deterministic_and_spans_index_the_answer(grounder: Grounder, first: GroundedAnswer):
    again = grounder.chat(IMAGE, QUESTION, threshold=0.0, **SHORT)
    assert again.answer == first.answer and again.token_ids == first.token_ids
    assert 0 < len(first.token_ids) <= SHORT["max_new_tokens"] and first.selector == "keywords"
    tokenizer = grounder.encode.prompt_builder.processor.tokenizer
    assert first.answer == tokenizer.decode(first.token_ids, skip_special_tokens=True)
    assert first.phrases and [p.char_span for p in again.phrases] == [p.char_span for p in first.phrases]
    for ours, theirs in zip(first.phrases, again.phrases, strict=True):
        assert torch.equal(ours.mask, theirs.mask) and ours.score == theirs.score
    check_phrases(first)


def test_a_multibyte_phrase_is_grounded_where_it_stands(grounder: Grounder, first: GroundedAnswer):
    # The tiny LMM's vocabulary is mostly non-Latin: its answer holds multi-byte words (CJK, emoji, ...).
    words = re.findall(r"[^\x00-\x7f\ufffd\s]+", first.answer)
    assert words, first.answer
    answer = grounder.chat(IMAGE, QUESTION, selector="given", phrases=[words[0]], **SHORT)
    assert answer.answer == first.answer and answer.selector == "given"
    (phrase,) = answer.phrases
    assert phrase.text == words[0] and phrase.score is None
    check_phrases(answer)
    tokenizer = grounder.encode.prompt_builder.processor.tokenizer
    assert words[0] in tokenizer.decode(answer.token_ids[slice(*phrase.token_span)])


def eager_answer_maps(
    grounder: Grounder, question: str, answer_ids: list[int], prefix: str = ""
) -> torch.Tensor:
    """``[T, L*H, h, w]``: each answer token's attention over the image tokens, from the eager model's
    own ``output_attentions`` on a teacher-forced forward over the chat prompt (plus ``prefix``) and the
    answer."""
    builder = grounder.encode.prompt_builder
    processor = builder.processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefix
    inputs = processor(images=[IMAGE], text=[prompt], return_tensors="pt", size=builder._size)
    answer = torch.tensor([answer_ids])
    start = inputs["input_ids"].shape[1]
    model_inputs = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
    model_inputs.update(
        input_ids=torch.cat([inputs["input_ids"], answer], dim=1),
        attention_mask=torch.ones(1, start + answer.shape[1], dtype=torch.long),
    )
    if "mm_token_type_ids" in model_inputs:
        pad = torch.zeros_like(answer)
        model_inputs["mm_token_type_ids"] = torch.cat([model_inputs["mm_token_type_ids"], pad], dim=1)
    lmm = grounder.model.lmm
    lmm.set_capture("eager")
    try:
        with torch.no_grad():
            attentions = lmm.model(**model_inputs, output_attentions=True).attentions  # L x [1, H, S, S]
    finally:
        lmm.set_capture("fused")
    image_columns = (model_inputs["input_ids"][0] == lmm.image_token_id).nonzero()[:, 0]
    _, grid_h, grid_w = (int(v) // m for v, m in zip(inputs["image_grid_thw"][0], (1, 2, 2), strict=True))
    rows = torch.arange(start, start + answer.shape[1])
    per_layer = [layer[0][:, rows][:, :, image_columns] for layer in attentions]  # L x [H, T, N]
    return torch.stack(per_layer).permute(2, 0, 1, 3).reshape(len(rows), -1, grid_h, grid_w)


def test_answer_attention_equals_the_eager_reference(grounder: Grounder, first: GroundedAnswer):
    """Each phrase's map is the mean, over its answer tokens, of the eager model's attention probabilities
    on a teacher-forced forward over the prompt and the answer as generated (fp32)."""
    per_token = eager_answer_maps(grounder, QUESTION, first.token_ids)
    for phrase in first.phrases:
        expected = per_token[phrase.token_span[0] : phrase.token_span[1]].mean(dim=0)
        torch.testing.assert_close(phrase.attention_map, expected, rtol=0, atol=1e-5)


def test_reasoning_segmentation_merges_the_generated_answer(grounder: Grounder):
    result = grounder.segment(IMAGE, "the red circle", max_new_tokens=8)
    assert result.question == "What is the red circle in this image?" and result.answer.startswith("It is")
    assert 0 < len(result.token_ids) <= 8 and result.token_span == (0, len(result.token_ids))
    assert result.mask.shape == result.coarse_mask.shape == (IMAGE.height, IMAGE.width)
    expected = eager_answer_maps(grounder, result.question, result.token_ids, prefix="It is").mean(dim=0)
    torch.testing.assert_close(result.attention_map, expected, rtol=0, atol=1e-5)
    sentence = grounder.segment(IMAGE, "Which shape would roll down a slope?", max_new_tokens=8)
    assert sentence.question == "Which shape would roll down a slope?"
    with pytest.raises(ChatInputError, match="the query is empty"):
        grounder.segment(IMAGE, " ")


def test_an_answer_that_grounds_nothing_is_an_answer(grounder: Grounder, first: GroundedAnswer):
    answer = grounder.chat(IMAGE, QUESTION, threshold=1.01, **SHORT)
    assert answer.answer == first.answer and answer.phrases == []
    assert answer.masks.shape == (0, IMAGE.height, IMAGE.width)


def test_a_malformed_lmm_reply_drops_its_phrases_with_a_warning(grounder: Grounder, first: GroundedAnswer):
    # The tiny LMM's reply to the phrase-listing turn is noise, not a JSON list.
    with pytest.warns(SelectorReplyWarning, match="selector=lmm"):
        answer = grounder.chat(IMAGE, QUESTION, selector="lmm", **SHORT)
    assert answer.answer == first.answer and answer.phrases == [] and answer.selector == "lmm"


def test_turns_carry_their_own_groundings(grounder: Grounder, first: GroundedAnswer):
    conversation = Conversation(grounder, IMAGE)
    one = conversation.ask(QUESTION, threshold=0.0, **SHORT)
    two = conversation.ask("Where is it?", threshold=0.0, **SHORT)
    assert conversation.turns == [one, two] and one.answer == first.answer
    # The second turn saw the first: the same question without history gets the answer of a fresh chat.
    alone = grounder.chat(IMAGE, "Where is it?", threshold=0.0, **SHORT)
    with_pairs = grounder.chat(
        IMAGE, "Where is it?", history=[(QUESTION, first.answer)], threshold=0.0, **SHORT
    )
    assert with_pairs.answer == two.answer
    assert alone.token_ids != two.token_ids
    assert torch.equal(one.masks, first.masks)  # the first turn's masks stay with it


def test_oldest_turns_leave_the_prompt_when_the_context_is_full(tiny_config, grounder: Grounder):
    history = [(f"Question {k}: " + "tell me more " * 8, "an answer " * 10) for k in range(4)]
    builder = grounder.encode.prompt_builder
    sample = make_sample(IMAGE.height, IMAGE.width, [], 7)
    full = builder.conversation_tokens(sample, builder.conversation_prompt(history, QUESTION))
    last_two = builder.conversation_tokens(sample, builder.conversation_prompt(history[2:], QUESTION))
    small = build_prompt_builder(tiny_config)
    small.max_length = last_two + SHORT["max_new_tokens"]
    assert small.max_length < full + SHORT["max_new_tokens"]
    squeezed = Grounder(grounder.model, small, tiny_config.sam.image_size, device="cpu")
    with pytest.warns(UserWarning, match="oldest 2 of 4 earlier turns are left out"):
        answer = squeezed.chat(IMAGE, QUESTION, history=history, threshold=0.0, **SHORT)
    assert answer.dropped_turns == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = grounder.chat(IMAGE, QUESTION, history=history[2:], threshold=0.0, **SHORT)
    assert answer.token_ids == expected.token_ids

    # Not even the question fits: refused, never answered without it.
    small = build_prompt_builder(tiny_config)
    small.max_length = 8
    with pytest.raises(ContextOverflowError, match="max_new_tokens=16"):
        Grounder(grounder.model, small, tiny_config.sam.image_size, device="cpu").chat(
            IMAGE, QUESTION, **SHORT
        )


@pytest.mark.parametrize("question", ["", "   \n\t", None])
def test_an_empty_question_is_refused(grounder: Grounder, question):
    with pytest.raises(ChatInputError, match="the question is empty"):
        grounder.chat(IMAGE, question)


def test_selector_choices_are_checked(grounder: Grounder, first: GroundedAnswer):
    with pytest.raises(ChatInputError, match="selector must be one of"):
        grounder.chat(IMAGE, QUESTION, selector="spacy")
    with pytest.raises(ChatInputError, match="needs phrases"):
        grounder.chat(IMAGE, QUESTION, selector="given")
    with pytest.raises(ChatInputError, match="history"):
        grounder.chat(IMAGE, QUESTION, history=["not a turn"])
    with pytest.raises(ChatInputError, match="does not occur in the answer"):
        grounder.chat(IMAGE, QUESTION, phrases=["certainly not in there"], **SHORT)


def test_a_checkpoint_without_selector_chats_with_lmm_or_given(tiny_config, first: GroundedAnswer):
    torch.manual_seed(0)
    config = copy.deepcopy(tiny_config)
    config.model.lmm.keyword_selector = False
    plain = Grounder(
        build_module(config).model, build_prompt_builder(config), config.sam.image_size, device="cpu"
    )
    with pytest.raises(ChatInputError, match="no keyword selector.*selector='lmm' or selector='given'"):
        plain.chat(IMAGE, QUESTION, selector="keywords")
    with pytest.warns(SelectorReplyWarning):
        answer = plain.chat(IMAGE, QUESTION, **SHORT)
    assert answer.selector == "lmm" and answer.answer == first.answer
    word = re.findall(r"[^\x00-\x7f\ufffd\s]+", first.answer)[0]
    given = plain.chat(IMAGE, QUESTION, phrases=[word], **SHORT)
    assert [p.text for p in given.phrases] == [word]
