"""Qwen3-VL on its tiny variant: prompt building, geometry, channels (capture, training step and demo run:
test_lmm_families)."""

from __future__ import annotations

import pytest
import torch
from samples import make_sample, png_like

from flmm_lightning.assets import build_tiny_qwen3_vl_processor, ensure_tiny_qwen3_vl, tiny_qwen3_vl_config
from flmm_lightning.lmm.qwen3_vl import Qwen3VLAdapter, Qwen3VLPromptBuilder

IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653
PATCH, MERGE = 16, 2


REFCOCO_LIKE = make_sample(100, 150, ["a man in a red shirt", "the dog on the left", "Café"], 0)
PNG_LIKE = png_like(230, 90)


@pytest.fixture(scope="module")
def tiny_dir():
    return ensure_tiny_qwen3_vl()


@pytest.fixture(scope="module")
def builder(tiny_dir):
    return Qwen3VLPromptBuilder(tiny_dir)


@pytest.mark.parametrize("sample", [REFCOCO_LIKE, PNG_LIKE], ids=["refcoco", "png"])
def test_prompt_puts_objects_after_the_image(builder, sample):
    prompt = builder(sample)
    tokenizer = builder.processor.tokenizer
    assert type(builder.processor).__name__ == "Qwen3VLProcessor"
    ids, mask_ids = prompt.input_ids, prompt.mask_ids
    assert ids.shape == mask_ids.shape and ids.dtype == mask_ids.dtype == torch.long
    for k, phrase in enumerate(sample.phrases):
        assert tokenizer.decode(ids[mask_ids == k]).strip() == phrase.strip()

    image_positions = (ids == IMAGE_PAD).nonzero().flatten()
    assert image_positions.numel() == prompt.grid_hw[0] * prompt.grid_hw[1]
    assert ids[image_positions[0] - 1] == VISION_START and ids[image_positions[-1] + 1] == VISION_END
    assert torch.all(image_positions[1:] - image_positions[:-1] == 1)
    for k in range(sample.num_objects):
        assert (mask_ids == k).nonzero().min() > image_positions.max()

    # Qwen3-VL's template: no default system turn.
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert (
        "<|vision_end|>Please give me a description of the image.<|im_end|>\n<|im_start|>assistant\n" in text
    )


def test_prompt_geometry_uses_16px_patches_and_2x2_merge(builder):
    prompt = builder(REFCOCO_LIKE)
    _, grid_h, grid_w = prompt.pixel_inputs["image_grid_thw"][0].tolist()
    assert prompt.grid_hw == (grid_h // MERGE, grid_w // MERGE)
    assert prompt.padded_hw == prompt.content_box[2:] == (grid_h * PATCH, grid_w * PATCH)
    assert prompt.padded_hw == (96, 160)  # 100x150 rounded to multiples of 32 px
    assert prompt.pixel_inputs["pixel_values"].shape[0] == grid_h * grid_w


def test_attention_channels_are_layers_times_heads(tiny_dir):
    adapter = Qwen3VLAdapter(tiny_dir, text_proj_dim=8, torch_dtype="float32")
    text = tiny_qwen3_vl_config().text_config
    assert adapter.attention_channels == text.num_hidden_layers * text.num_attention_heads == 16
    assert type(adapter.model).__name__ == "Qwen3VLForConditionalGeneration"


def test_tiny_config_has_what_the_family_needs():
    """What Qwen3-VL differs in from Qwen2.5-VL, on the tiny variant: the processor's 16-px patches and 2x2
    merge are the vision tower's, DeepStack feeds the first decoder layers from vision blocks, the
    interleaved M-RoPE sections cover head_dim/2 frequencies, the merged tokens have the decoder's width."""
    config = tiny_qwen3_vl_config()
    text, vision = config.text_config, config.vision_config
    image_processor = build_tiny_qwen3_vl_processor().image_processor
    assert vision.patch_size == image_processor.patch_size == PATCH
    assert vision.spatial_merge_size == image_processor.merge_size == MERGE
    assert vision.temporal_patch_size == image_processor.temporal_patch_size
    assert all(0 <= i < vision.depth for i in vision.deepstack_visual_indexes)
    assert len(vision.deepstack_visual_indexes) <= text.num_hidden_layers
    assert text.rope_parameters["mrope_interleaved"]
    assert sum(text.rope_parameters["mrope_section"]) * 2 == text.head_dim
    assert vision.out_hidden_size == text.hidden_size
    assert not hasattr(vision, "fullatt_block_indexes")  # no windowed attention, unlike Qwen2.5-VL


def test_adapter_refuses_another_family(tmp_path):
    from flmm_lightning.assets import ensure_tiny_qwen2_5_vl

    with pytest.raises(ValueError, match="qwen3_vl"):
        Qwen3VLAdapter(ensure_tiny_qwen2_5_vl(), text_proj_dim=8, torch_dtype="float32")
