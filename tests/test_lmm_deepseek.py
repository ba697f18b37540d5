"""DeepSeek-VL and its hybrid on their tiny variants: prompts, the padded square and its content box; what
every family does is in test_lmm_families."""

from __future__ import annotations

import pytest
import torch
from samples import make_sample, png_like

from flmm_lightning.assets import (
    DEEPSEEK_SYSTEM_PROMPT,
    ensure_tiny_deepseek_vl,
    ensure_tiny_deepseek_vl_hybrid,
    ensure_tiny_llava,
)
from flmm_lightning.lmm.deepseek_vl import DeepseekVLAdapter, DeepseekVLPromptBuilder

WIDE = make_sample(100, 150, ["a man in a red shirt", "the dog on the left", "Café"], 0)
TALL = png_like(230, 90)
VARIANTS = {"plain": ensure_tiny_deepseek_vl, "hybrid": ensure_tiny_deepseek_vl_hybrid}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    tiny_dir = VARIANTS[request.param]()
    return tiny_dir, DeepseekVLPromptBuilder(tiny_dir)


@pytest.mark.parametrize("sample", [WIDE, TALL], ids=["refcoco", "png"])
def test_prompt_puts_objects_after_the_image(variant, sample):
    _, builder = variant
    prompt = builder(sample)
    tokenizer = builder.processor.tokenizer
    ids, mask_ids = prompt.input_ids, prompt.mask_ids
    for k, phrase in enumerate(sample.phrases):
        assert tokenizer.decode(ids[mask_ids == k]).strip() == phrase.strip()
    image_token = builder.processor.image_token_id
    image_positions = (ids == image_token).nonzero().flatten()
    assert image_positions.numel() == 64 and prompt.grid_hw == (8, 8)
    assert torch.all(image_positions[1:] - image_positions[:-1] == 1)
    for k in range(sample.num_objects):
        assert (mask_ids == k).nonzero().min() > image_positions.max()
    text = tokenizer.decode(ids[(mask_ids < 0) & (ids != image_token)], skip_special_tokens=True)
    # The reference's grounding prompt has no system text (its DeepSeek-VL configs: SYSTEM='').
    assert text.startswith("User: Please give me a description of the image.\n\nAssistant:")
    assert DEEPSEEK_SYSTEM_PROMPT not in text and ids[0] == tokenizer.bos_token_id


def _background_rows_and_columns(pixels: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The pixels outside ``box`` (top, left, height, width) of ``pixels`` [3, S, S], as [3, k]."""
    top, left, height, width = box
    outside = torch.ones(pixels.shape[-2:], dtype=torch.bool)
    outside[top : top + height, left : left + width] = False
    return pixels[:, outside]


@pytest.mark.parametrize("sample", [WIDE, TALL], ids=["wide", "tall"])
def test_content_box_is_where_the_image_lies_in_the_padded_square(variant, sample):
    _, builder = variant
    prompt = builder(sample)
    side = prompt.padded_hw[0]
    top, left, height, width = prompt.content_box
    assert prompt.padded_hw == (side, side) and max(height, width) == side
    assert abs(height / width - sample.image.height / sample.image.width) < 0.02
    # Centred: the padding after the image is the same as before, or one pixel more.
    assert (top == 0 or left == 0) and side - 2 * top - height in (0, 1) and side - 2 * left - width in (0, 1)

    key = "high_res_pixel_values" if "high_res_pixel_values" in prompt.pixel_inputs else "pixel_values"
    pixels = prompt.pixel_inputs[key][0]  # [3, side, side]
    assert pixels.shape[-1] == side
    # Outside the box: one flat colour, the padding. Inside, one pixel in from each edge: the noise image.
    outside = _background_rows_and_columns(pixels, prompt.content_box)
    assert outside.numel() > 0 and (outside - outside[:, :1]).abs().max() < 1e-5
    inner = pixels[:, top + 1 : top + height - 1, left + 1 : left + width - 1]
    assert inner.std(dim=(1, 2)).min() > 0.1
    # The box is tight: its first and last rows and columns are image, not padding.
    content = pixels[:, top : top + height, left : left + width] - outside[:, :1, None]
    for edge in (content[:, 0], content[:, -1], content[..., 0], content[..., -1]):
        assert edge.abs().amax(dim=0).mean() > 0.1


def test_plain_square_is_the_references_resize_and_padding(fixtures_dir):
    """The reference's processor: longer side to 128 px, the other ``int(h / longest * 128)``, PIL bicubic,
    centred on a square of ``int(255 * 0.5) = 127``, then (x / 255 - 0.5) / 0.5."""
    from PIL import Image

    builder = DeepseekVLPromptBuilder(ensure_tiny_deepseek_vl())
    with Image.open(fixtures_dir / "coco_sample/images/000000142238.jpg") as photo:
        image = photo.convert("RGB")
    sample = make_sample(image.height, image.width, ["a man"], 0)
    sample.image = image
    prompt = builder(sample)
    height = int(image.height / image.width * 128)
    top = (128 - height) // 2
    assert prompt.content_box == (top, 0, height, 128)
    resized = torch.tensor(
        list(image.resize((128, height), Image.Resampling.BICUBIC).getdata()), dtype=torch.float32
    )
    expected = (resized.T.reshape(3, height, 128) / 255 - 0.5) / 0.5
    pixels = prompt.pixel_inputs["pixel_values"][0]
    torch.testing.assert_close(pixels[:, top : top + height], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        pixels[:, :top], torch.full((3, top, 128), (127 / 255 - 0.5) / 0.5), atol=1e-6, rtol=0
    )


def test_hybrid_pixels_are_the_references_square_and_in_tower_resize():
    """The reference's hybrid: its processor resizes the longer side to the SAM side (256 px here) and the
    other to ``int(h / longest * 256)``, pads in ``int(255 * CLIP mean)`` and only rescales; the tower
    normalises that square with CLIP's statistics for SAM, and resizes it to the SigLIP side (128)
    bilinearly with antialiasing (halving: weights 1/8, 3/8, 3/8, 1/8 over four rows) before normalising
    with 0.5 / 0.5."""
    from PIL import Image

    builder = DeepseekVLPromptBuilder(ensure_tiny_deepseek_vl_hybrid())
    colour, background = (200, 50, 10), (122, 116, 104)  # int(255 * OpenAI CLIP mean)
    # 300 x 199: 199 / 300 * 256 = 169.8, truncated to 169 rows (rounding gives 170)
    sample = make_sample(199, 300, ["a man"], 0)
    sample.image = Image.new("RGB", (300, 199), colour)
    prompt = builder(sample)
    top = (256 - 169) // 2  # 43: rows 43 .. 211 are the image
    assert prompt.content_box == (top, 0, 169, 256)

    def unit(rgb):
        return torch.tensor(rgb, dtype=torch.float32)[:, None] / 255

    clip_mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None]
    clip_std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None]
    high = prompt.pixel_inputs["high_res_pixel_values"][0]  # [3, 256, 256]
    for rows, rgb in ((range(0, top), background), (range(top, 212), colour), (range(212, 256), background)):
        expected = (unit(rgb) - clip_mean) / clip_std
        torch.testing.assert_close(high[:, list(rows)].flatten(1), expected.expand(3, len(rows) * 256))
    low = prompt.pixel_inputs["pixel_values"][0]  # [3, 128, 128]
    # low row j averages high rows 2j-1 .. 2j+2: row 21 = rows 41-44 (half padding), row 105 = rows 209-212
    # (one eighth padding), rows 22 .. 104 only image, row 19 only padding
    for row, image_share in ((19, 0.0), (21, 0.5), (22, 1.0), (104, 1.0), (105, 7 / 8)):
        mixed = image_share * unit(colour) + (1 - image_share) * unit(background)
        torch.testing.assert_close(low[:, row], ((mixed - 0.5) / 0.5).expand(3, 128))


def test_siglip_mlp_uses_the_exact_gelu():
    """The reference's timm SigLIP uses ``nn.GELU`` (erf); transformers' config names the tanh one."""
    adapter = DeepseekVLAdapter(ensure_tiny_deepseek_vl(), text_proj_dim=8, torch_dtype="float32")
    mlps = [m for m in adapter.model.modules() if type(m).__name__ == "SiglipMLP"]
    assert mlps and all(
        isinstance(m.activation_fn, torch.nn.GELU) and m.activation_fn.approximate == "none" for m in mlps
    )
    x = torch.linspace(-3, 3, 101)
    torch.testing.assert_close(
        mlps[0].activation_fn(x), 0.5 * x * (1 + torch.erf(x / 2**0.5)), atol=1e-6, rtol=0
    )


def test_refuses_another_family():
    with pytest.raises(ValueError, match="deepseek_vl"):
        DeepseekVLAdapter(ensure_tiny_llava(), text_proj_dim=8, torch_dtype="float32")
