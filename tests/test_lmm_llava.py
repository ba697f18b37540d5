"""LLaVA-1.5 and LLaVA-NeXT on their tiny variants: prompts, the padded square (1.5) and the two stacked grids
(NeXT); what every family does is in test_lmm_families."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from samples import make_sample, png_like

from flmm_lightning.assets import CLIP_MEAN, CLIP_STD, ensure_tiny_llava, ensure_tiny_llava_next
from flmm_lightning.heads.unet import crop_to_content
from flmm_lightning.lmm.llava import LlavaAdapter, LlavaPromptBuilder
from flmm_lightning.lmm.llava_next import LlavaNextAdapter, LlavaNextPromptBuilder

WIDE = make_sample(100, 150, ["a man in a red shirt", "the dog on the left", "Café"], 0)
TALL = png_like(230, 90)
FAMILIES = {
    "llava": (ensure_tiny_llava, LlavaPromptBuilder, LlavaAdapter),
    "llava_next": (ensure_tiny_llava_next, LlavaNextPromptBuilder, LlavaNextAdapter),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    ensure, builder_class, adapter_class = FAMILIES[request.param]
    tiny_dir = ensure()
    return tiny_dir, builder_class(tiny_dir), adapter_class


@pytest.mark.parametrize("sample", [WIDE, TALL], ids=["refcoco", "png"])
def test_prompt_puts_objects_after_the_image(family, sample):
    _, builder, _ = family
    prompt = builder(sample)
    tokenizer = builder.processor.tokenizer
    ids, mask_ids = prompt.input_ids, prompt.mask_ids
    assert ids.shape == mask_ids.shape and ids.dtype == mask_ids.dtype == torch.long
    for k, phrase in enumerate(sample.phrases):
        assert tokenizer.decode(ids[mask_ids == k]).strip() == phrase.strip()

    image_positions = (ids == builder.processor.image_token_id).nonzero().flatten()
    assert torch.all(image_positions[1:] - image_positions[:-1] == 1)
    for k in range(sample.num_objects):
        assert (mask_ids == k).nonzero().min() > image_positions.max()
    # The Vicuna template, BOS first, the image where the placeholder was.
    text = tokenizer.decode(ids[(mask_ids < 0) & (ids != builder.processor.image_token_id)])
    assert text.startswith("<s> USER: \nPlease give me a description of the image. ASSISTANT:")
    assert ids[0] == tokenizer.bos_token_id and (mask_ids[: image_positions[0]] == -1).all()


def test_llava_pads_to_a_square_in_the_mean_colour():
    builder = LlavaPromptBuilder(ensure_tiny_llava())
    prompt = builder(WIDE)  # 150 wide, 100 high
    # As the reference's processor: the longer side resized to 112 px, the other truncated (100 * 112 / 150 =
    # 74.67 -> 74), then 112 - 74 = 38 rows of padding, 19 above and 19 below; the square is the padded frame.
    assert prompt.padded_hw == (112, 112) and prompt.content_box == (19, 0, 74, 112)
    assert prompt.grid_hw == (8, 8)
    assert (prompt.input_ids == builder.processor.image_token_id).sum() == 64

    pixels = prompt.pixel_inputs["pixel_values"][0]  # [3, 112, 112]
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    colour = torch.tensor([int(m * 255) for m in CLIP_MEAN], dtype=torch.float32)[:, None, None] / 255
    expected = (colour - mean) / std
    # padding rows hold the colour exactly (float32 round-off of rescale and normalise only)
    torch.testing.assert_close(pixels[:, :19], expected.expand(3, 19, 112), atol=1e-6, rtol=0)
    torch.testing.assert_close(pixels[:, -19:], expected.expand(3, 19, 112), atol=1e-6, rtol=0)
    assert (pixels[:, 56] - expected).abs().amax() > 0.1  # the noise image itself

    # The coarse mask loses the padding rows: of 64x64 logits, rows from int(19 * 64 / 112) = 10, as many as
    # int(74 * 64 / 112 + 0.5) = 42.
    logits = torch.arange(64.0).repeat_interleave(64).view(1, 64, 64)
    cropped = crop_to_content(logits, prompt.padded_hw, prompt.content_box)
    assert cropped.shape == (1, 42, 64) and cropped[0, 0, 0] == 10 and cropped[0, -1, 0] == 51


def test_phrase_separator_is_one_token_as_in_the_reference(family):
    """RefCOCO and inference: after each phrase the reference appends ``encode(".")[-1]`` alone (a
    SentencePiece tokeniser encodes "." as "▁", "."); a narrative's own "." utterance keeps all its tokens."""
    _, builder, _ = family
    tokenizer = builder.processor.tokenizer
    separator = tokenizer.encode(".", add_special_tokens=False)
    prompt = builder(WIDE)
    start = prompt.utterance_start
    after_phrases = prompt.input_ids[start:][prompt.mask_ids[start:] == -1]
    assert after_phrases.tolist() == [separator[-1]] * WIDE.num_objects

    narrative = png_like(230, 90)
    narrative.utterances = [(narrative.phrases[0], 0), (narrative.phrases[1], 1), (".", -1)]
    narrative.narrative = True
    prompt = builder(narrative)
    assert prompt.input_ids[-len(separator) :].tolist() == separator
    assert (prompt.mask_ids[-len(separator) :] == -1).all()


def test_llava_next_grid_is_the_unpadded_anyres_grid():
    builder = LlavaNextPromptBuilder(ensure_tiny_llava_next())
    wide, tall = builder(WIDE), builder(TALL)
    # 150x100 -> pinpoint 112x224 (h x w): 8x16 cells, 2 padding columns removed on the left and right.
    assert wide.grid_hw == (8, 12) and wide.content_box == (0, 0, *wide.padded_hw)
    assert wide.pixel_inputs["pixel_values"].shape == (1, 3, 3, 112, 112)  # base image + 2 crops
    image_token = builder.processor.image_token_id
    for prompt in (wide, tall):
        h, w = prompt.grid_hw
        assert (prompt.input_ids == image_token).sum() == 8 * 8 + h * (w + 1)
    batch = builder.collate([wide, tall])
    # 90x230 -> pinpoint 336x112: base + 3 crops; the wide image's 3 are padded with a zero crop.
    assert batch.pixel_inputs["pixel_values"].shape[:2] == (2, 4)
    assert not batch.pixel_inputs["pixel_values"][0, 3].any()
    assert batch.pixel_inputs["image_sizes"].tolist() == [[100, 150], [230, 90]]


def test_llava_next_stacks_the_base_grid_resized_and_the_anyres_grid():
    """Against the model's own eager attentions: base maps resized to the any-res grid, then any-res maps
    without the newline column."""
    tiny_dir = ensure_tiny_llava_next()
    builder = LlavaNextPromptBuilder(tiny_dir)
    adapter = LlavaNextAdapter(tiny_dir, text_proj_dim=8, capture="eager", torch_dtype="float32")
    prompt = builder(TALL)
    batch = builder.collate([prompt])
    with torch.no_grad():
        features = adapter(batch)[0]
        outputs = adapter.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_inputs["pixel_values"],
            image_sizes=batch.pixel_inputs["image_sizes"],
            output_attentions=True,
        )
    image_columns = (prompt.input_ids == builder.processor.image_token_id).nonzero().flatten()
    h, w = prompt.grid_hw
    for k in range(TALL.num_objects):
        rows = (prompt.mask_ids == k).nonzero().flatten()
        per_layer = [attn[0][:, rows][:, :, image_columns].mean(dim=1) for attn in outputs.attentions]
        maps = torch.cat(per_layer)  # [L*H, N], layer-major
        base = F.interpolate(maps[:, :64].reshape(1, -1, 8, 8), size=(h, w), mode="bilinear")[0]
        anyres = maps[:, 64:].reshape(-1, h, w + 1)[..., :w]
        expected = torch.cat([base, anyres])  # [2*L*H, h, w]
        assert features.attention_maps.shape == (TALL.num_objects, adapter.attention_channels, h, w)
        torch.testing.assert_close(features.attention_maps[k], expected, rtol=0, atol=1e-6)


def test_adapters_refuse_each_others_checkpoints():
    with pytest.raises(ValueError, match="llava_next"):
        LlavaNextAdapter(ensure_tiny_llava(), text_proj_dim=8, torch_dtype="float32")
    with pytest.raises(ValueError, match="expected a LlavaProcessor, found LlavaNextProcessor"):
        LlavaPromptBuilder(ensure_tiny_llava_next())(WIDE)
