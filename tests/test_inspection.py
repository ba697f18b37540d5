"""Look inside the LMM (``Grounder.attention``) on the tiny offline models: every question and answer word's
attention maps, the heat-map over the displayed image, the answer's words ranked by a box, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from PIL import Image
from samples import make_sample

from flmm_lightning.inference.conversation import ChatInputError
from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.inference.inspection import AttentionView, AttentionWord
from flmm_lightning.runs.build import build_module, build_prompt_builder

IMAGE = make_sample(100, 150, [], 7).image  # not square
QUESTION = "What is in the image?"
SHORT = {"max_new_tokens": 12}
PHOTO = "coco_sample/images/000000142238.jpg"
EXIF_ORIENTATION, ROTATE_CLOCKWISE = 0x0112, 6
# The demo's Qwen2.5-VL and LLaVA-NeXT (grids over the image), LLaVA-1.5 and DeepSeek-VL (padded squares).
FAMILIES = ["demo", "tiny_llava", "tiny_llava_next", "tiny_deepseek_vl"]
PADDED = {"tiny_llava", "tiny_deepseek_vl"}


pytestmark = pytest.mark.usefixtures("pinned_threads")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def grounder(family: str, compose_config, tmp_path_factory) -> Grounder:
    """An untrained tiny model of the family (the demo experiment's, or another tiny LMM), fp32 on the CPU."""
    overrides = tiny_overrides(tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("run"))
    if family != "demo":
        overrides.append(f"model={family}")
    config = compose_config(overrides)
    torch.manual_seed(0)
    return Grounder(build_module(config).model, build_prompt_builder(config), config.sam.image_size, "cpu")


@pytest.fixture(scope="module")
def view(grounder: Grounder) -> AttentionView:
    return grounder.attention(IMAGE, QUESTION, **SHORT)


def test_words_index_the_question_and_the_answer(grounder: Grounder, view: AttentionView):
    assert view.question == QUESTION and view.answer
    chat = grounder.chat(IMAGE, QUESTION, threshold=1.01, **SHORT)
    assert view.answer == chat.answer  # the same greedy answer
    parts = [word.part for word in view.words]
    assert parts == sorted(parts, key=("question", "answer").index)  # question words first
    for part, text in (("question", view.question), ("answer", view.answer)):
        words = [word for word in view.words if word.part == part]
        assert [word.text for word in words] == text.split()
        assert all(text[word.char_span[0] : word.char_span[1]] == word.text for word in words)
    spans = [word.token_span for word in view.words]
    assert spans[0][0] == 0 and all(first < last for first, last in spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # in order, disjoint
    assert view.maps.dtype == torch.float32 and view.maps.shape[0] >= spans[-1][1]
    lmm = grounder.model.lmm  # LLaVA-NeXT: 2 L layers, the base grid's then the any-res grid's
    assert view.num_layers * view.num_heads == lmm.attention_channels and view.num_heads == lmm.num_heads


def test_answer_words_have_the_maps_chat_grounds_with(grounder: Grounder, view: AttentionView):
    """A phrase's map in chat (merge=mean) is the mean of its tokens' rows of ``maps``."""
    answer_words = [word for word in view.words if word.part == "answer"]
    first_answer_row = answer_words[0].token_span[0]
    chat = grounder.chat(IMAGE, QUESTION, selector="given", phrases=[answer_words[-1].text], **SHORT)
    (phrase,) = chat.phrases
    first, last = phrase.token_span
    expected = phrase.attention_map  # [C, h, w]
    ours = view.maps[first_answer_row + first : first_answer_row + last].mean(dim=0)  # [L, H, h, w]
    # Both are means of the same probabilities (<= 1), read over different query rows: at most a few float32
    # roundings apart.
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(ours.reshape(expected.shape), expected, rtol=0, atol=8 * eps)


def test_question_words_have_their_own_maps(family: str, view: AttentionView):
    question = [word for word in view.words if word.part == "question"]
    answer = [word for word in view.words if word.part == "answer"]
    assert len(question) == len(QUESTION.split())
    maps = view.maps.flatten(3)  # [T, L, H, h * w]
    assert (maps >= 0).all() and (maps.sum(-1) > 0).all()
    if family != "tiny_llava_next":  # NeXT's maps are resized and cut grids, not the image tokens as such
        assert (maps.sum(-1) <= 1 + 1e-5).all()  # a share of each token's attention probabilities
    q_first, q_last = question[0].token_span
    a_first, a_last = answer[0].token_span
    assert not torch.allclose(view.maps[q_first:q_last].mean(0), view.maps[a_first:a_last].mean(0))


def test_question_maps_are_the_eager_models_attention(family: str, grounder: Grounder, view: AttentionView):
    """The question's rows are the eager model's own attention probabilities at the question's tokens, found
    here from the tokenizer: the question's ids right before the Qwen template's end of the user turn."""
    if family != "demo":
        pytest.skip("the template's text after the question is Qwen's")
    builder, lmm = grounder.encode.prompt_builder, grounder.model.lmm
    tokenizer = builder.processor.tokenizer
    question_ids = tokenizer.encode(QUESTION, add_special_tokens=False)
    suffix_ids = tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    sample = make_sample(IMAGE.height, IMAGE.width, [], 7)
    inputs = builder.conversation_inputs(sample, builder.conversation_prompt([], QUESTION), [])
    ids = inputs.input_ids
    start = len(ids) - len(suffix_ids) - len(question_ids)
    assert ids[start : start + len(question_ids)].tolist() == question_ids
    image_tokens = ids == lmm.image_token_id
    lmm.set_capture("eager")
    try:
        with torch.no_grad():
            attentions = lmm.model(
                input_ids=ids[None],
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                mm_token_type_ids=image_tokens[None].long(),
                output_attentions=True,
                **inputs.pixel_inputs,
            ).attentions  # L x [1, H, S, S]
    finally:
        lmm.set_capture("fused")
    rows = torch.arange(start, start + len(question_ids))
    expected = torch.stack([layer[0][:, rows][:, :, image_tokens] for layer in attentions])  # [L, H, T, N]
    expected = expected.permute(2, 0, 1, 3).reshape(len(rows), lmm.num_layers, lmm.num_heads, *inputs.grid_hw)
    torch.testing.assert_close(view.maps[: len(question_ids)], expected, rtol=0, atol=1e-5)


def independent_heatmap(view: AttentionView, word: int, layer: int | None, head: int | None) -> np.ndarray:
    """The word's map by numpy: mean over its tokens, the layer and head chosen, cropped to the content
    cells, resized by PIL's bilinear filter to the image, divided by its maximum."""
    first, last = view.words[word].token_span
    maps = view.maps[first:last].double().numpy().mean(axis=0)  # [L, H, h, w]
    maps = maps.mean(axis=0) if layer is None else maps[layer]
    grid = maps.mean(axis=0) if head is None else maps[head]  # [h, w]
    if view.content_box is not None:
        (ph, pw), (top, left, height, width) = view.padded_hw, view.content_box
        rows, cols = grid.shape
        # The head's rounding (``crop_to_content``): the offset truncated, the size rounded half up.
        y0, x0 = int(np.floor(top * rows / ph)), int(np.floor(left * cols / pw))
        size_h, size_w = int(np.floor(height * rows / ph + 0.5)), int(np.floor(width * cols / pw + 0.5))
        grid = grid[y0 : y0 + size_h, x0 : x0 + size_w]
    resized = np.asarray(
        Image.fromarray(grid.astype(np.float32), mode="F").resize(view.image.size, Image.Resampling.BILINEAR)
    )
    return resized / resized.max()


@pytest.mark.parametrize("layer, head", [(None, None), (1, None), (None, 2), (3, 0)])
def test_heatmap_is_the_word_map_over_the_displayed_image(view: AttentionView, layer, head):
    word = len(view.words) - 1
    heat = view.heatmap(word, layer, head)
    assert heat.dtype == np.float32 and heat.shape == (IMAGE.height, IMAGE.width)
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(heat, independent_heatmap(view, word, layer, head), rtol=0, atol=1e-5)


def test_heatmap_crops_the_padding(family: str, view: AttentionView):
    grid_hw = tuple(view.maps.shape[-2:])
    if family in PADDED:  # the wide image padded above and below
        assert view.word_map(0).shape[0] < grid_hw[0] and view.word_map(0).shape[1] == grid_hw[1]
    else:  # the grid covers exactly the image
        assert tuple(view.word_map(0).shape) == grid_hw
    for word in range(len(view.words)):
        expected = independent_heatmap(view, word, None, None)
        np.testing.assert_allclose(view.heatmap(word), expected, rtol=0, atol=1e-5)


def test_a_sideways_phone_photo_is_inspected_as_displayed(grounder: Grounder, fixtures_dir: Path, tmp_path):
    with Image.open(fixtures_dir / PHOTO) as photo:
        stored = photo.convert("RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_CLOCKWISE
    path = tmp_path / "sideways.jpg"
    stored.save(path, exif=exif, quality=95)
    view = grounder.attention(path, QUESTION, answer="a man with a kite")
    assert view.image.size == (stored.height, stored.width)  # turned upright
    assert view.heatmap(len(view.words) - 1).shape == (stored.width, stored.height)
    assert [word.text for word in view.words if word.part == "answer"] == ["a", "man", "with", "a", "kite"]


def test_a_given_answer_is_read_teacher_forced(grounder: Grounder, view: AttentionView):
    given = grounder.attention(IMAGE, QUESTION, answer=view.answer)
    assert given.answer == view.answer
    assert [word.text for word in given.words] == [word.text for word in view.words]
    q = [word for word in view.words if word.part == "question"]
    torch.testing.assert_close(given.maps[: q[-1].token_span[1]], view.maps[: q[-1].token_span[1]])
    with_history = grounder.attention(IMAGE, "assistant", answer="", history=[(QUESTION, view.answer)])
    assert [(w.text, w.part) for w in with_history.words] == [("assistant", "question")]


def hand_built(padded: bool = False) -> AttentionView:
    """Three answer words on a 40x20 image (a 2x4 grid): A attends to the left half (3:1 between its two
    columns), B to the right half only, Z nowhere on the image; word Q is a question word."""
    maps = torch.zeros(4, 2, 3, 2, 4)  # [T, L, H, h, w]
    maps[0, ..., :, 0], maps[0, ..., :, 1] = 0.3, 0.1  # Q
    maps[1, ..., :, 0], maps[1, ..., :, 1] = 0.3, 0.1  # A
    maps[2, ..., :, 2:] = 0.2  # B
    maps[1, 1, 2] *= 2  # a louder head: the shares are of the layer/head mean, unchanged by a scale
    padded_hw, box = None, None
    if padded:  # the same content with a padding row above and below it (a 40x40 square around the image)
        maps = torch.cat([torch.full((4, 2, 3, 1, 4), 0.5), maps, torch.full((4, 2, 3, 1, 4), 0.5)], dim=3)
        padded_hw, box = (40, 40), (10, 0, 20, 40)
    words = [
        AttentionWord("Q", "question", (0, 1), (0, 1)),
        AttentionWord("A", "answer", (0, 1), (1, 2)),
        AttentionWord("B", "answer", (2, 3), (2, 3)),
        AttentionWord("Z", "answer", (4, 5), (3, 4)),
    ]
    return AttentionView("Q", "A B Z", words, maps, Image.new("RGB", (40, 20)), padded_hw, box)


@pytest.mark.parametrize("padded", [False, True])
def test_rank_region_shares_are_the_attention_inside_the_box(padded: bool):
    view = hand_built(padded)
    assert view.rank_region((0, 0, 20, 20)) == [(1, 1.0), (2, 0.0), (3, 0.0)]
    assert view.rank_region((20, 0, 40, 20)) == [(2, 1.0), (1, 0.0), (3, 0.0)]
    left_column = view.rank_region((0, 0, 10, 20))  # A's column 0 holds 3 of its 4 parts
    assert left_column == [(1, pytest.approx(0.75)), (2, 0.0), (3, 0.0)]
    straddling = view.rank_region((5, 0, 15, 10))  # half of each left column, the top row of two
    # A in the box: half of each column's top cell, 0.5 * 0.3 + 0.5 * 0.1, of its 2 * (0.3 + 0.1)
    assert straddling == [(1, pytest.approx(0.25)), (2, 0.0), (3, 0.0)]
    middle = view.rank_region((10, 0, 30, 20))  # A's column 1 (1/4) and B's column 2 (1/2)
    assert middle == [(2, pytest.approx(0.5)), (1, pytest.approx(0.25)), (3, 0.0)]
    whole = view.rank_region((0, 0, 40, 20))
    assert whole == [(1, pytest.approx(1.0)), (2, pytest.approx(1.0)), (3, 0.0)]
    assert view.rank_region((0, 0, 40, 20), part="question") == [(0, pytest.approx(1.0))]


@pytest.mark.parametrize("padded", [False, True])
def test_heatmap_of_a_hand_built_view(padded: bool):
    view = hand_built(padded)
    heat_a, heat_b = view.heatmap(1), view.heatmap(2)
    assert heat_a.shape == heat_b.shape == (20, 40) and heat_a.max() == heat_b.max() == 1.0
    assert (heat_a[:, 25:] == 0).all() and (heat_b[:, :15] == 0).all()  # beyond the bilinear blend
    np.testing.assert_allclose(heat_a, independent_heatmap(view, 1, None, None), rtol=0, atol=1e-6)
    assert (view.heatmap(3) == 0).all()  # nothing on the image (the padding's attention cut): zeros stay


def test_rank_region_on_a_real_view_sums_to_one_over_a_split(view: AttentionView):
    width, height = view.image.size
    left = dict(view.rank_region((0, 0, width / 3, height)))
    right = dict(view.rank_region((width / 3, 0, width, height)))
    assert set(left) == {k for k, word in enumerate(view.words) if word.part == "answer"}
    for index in left:
        assert left[index] + right[index] == pytest.approx(1.0, abs=1e-9)
    ranked = view.rank_region((0, 0, width / 3, height))
    assert [share for _, share in ranked] == sorted(left.values(), reverse=True)


def test_bad_inputs_are_refused(grounder: Grounder, view: AttentionView):
    for question in ("", "  \n", None):
        with pytest.raises(ChatInputError, match="the question is empty"):
            grounder.attention(IMAGE, question)
    last = len(view.words) - 1
    with pytest.raises(ValueError, match=rf"word must be an int in \[0, {last}\]"):
        view.heatmap(last + 1)
    with pytest.raises(ValueError, match=rf"layer must be an int in \[0, {view.num_layers - 1}\]"):
        view.heatmap(0, layer=view.num_layers)
    with pytest.raises(ValueError, match=rf"head must be an int in \[0, {view.num_heads - 1}\]"):
        view.heatmap(0, head=-1)
    width, height = view.image.size
    for box in [(-1, 0, 10, 10), (0, 0, width + 1, 10), (0, 0, 10, height + 0.5)]:
        with pytest.raises(ValueError, match="reaches outside"):
            view.rank_region(box)
    with pytest.raises(ValueError, match="x1 < x0"):
        view.rank_region((20, 0, 10, 10))
    with pytest.raises(ValueError, match="part must be one of"):
        view.rank_region((0, 0, 10, 10), part="prompt")
