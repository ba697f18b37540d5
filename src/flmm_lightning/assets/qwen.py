"""Tiny Qwen2.5-VL and Qwen3-VL: the released architectures scaled down, with the real tokenizer."""

from __future__ import annotations

import os
from typing import Any

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from flmm_lightning.assets.store import DEFAULT_INITIALIZER_RANGE, DEFAULT_SEED, write_tiny_lmm
from flmm_lightning.assets.text_tokenizers import build_qwen2_5_vl_tokenizer, build_qwen3_vl_tokenizer

QWEN2_5_VL_VOCAB_SIZE = 151936  # embedding rows of the released checkpoints (padded beyond the tokenizer)
TINY_TEXT_HIDDEN, TINY_TEXT_HEADS = 64, 4

QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 256 * 256


def build_tiny_qwen2_5_vl_processor() -> Qwen2_5_VLProcessor:
    image_kwargs = dict(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS, patch_size=14, merge_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**image_kwargs),
        tokenizer=build_qwen2_5_vl_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(**image_kwargs),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )


def tiny_qwen_vl_config(
    config_class: type[Qwen2_5_VLConfig] | type[Qwen3VLConfig],
    initializer_range: float,
    text: dict[str, Any],
    vision: dict[str, Any],
) -> Qwen2_5_VLConfig | Qwen3VLConfig:
    """The scaled-down layout the Qwen2.5-VL and Qwen3-VL families share, with a family's own ``text`` and
    ``vision`` settings added: 4 decoder layers, 4 heads on 2 kv heads (GQA), hidden 64, the released
    vocabulary and token ids; a vision tower 64 wide that merges 2x2 patches into one token of the decoder's
    width."""
    text_config = dict(
        vocab_size=QWEN2_5_VL_VOCAB_SIZE,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=TINY_TEXT_HEADS,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        initializer_range=initializer_range,
        bos_token_id=151643,
        eos_token_id=151645,
        dtype="float32",
        **text,
    )
    vision_config = dict(
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=TINY_TEXT_HIDDEN,
        initializer_range=initializer_range,
        **vision,
    )
    return config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
        dtype="float32",
    )


def tiny_qwen2_5_vl_config(initializer_range: float = DEFAULT_INITIALIZER_RANGE) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-3B's architecture scaled down (``tiny_qwen_vl_config``): 2 vision blocks over 14-px patches
    attending within windows, the last over the whole image."""
    # M-RoPE splits head_dim/2 rotary frequencies into (temporal, height, width) like the released 16:24:24.
    mrope_section = [2, 3, 3]
    assert sum(mrope_section) == TINY_TEXT_HIDDEN // TINY_TEXT_HEADS // 2
    text = dict(
        use_sliding_window=False,
        max_window_layers=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section},
    )
    vision = dict(
        depth=2,
        hidden_act="silu",
        patch_size=14,
        # 56 px = 2x2 merged tokens per window; the last block attends over the whole image, as in the release
        window_size=56,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    )
    return tiny_qwen_vl_config(Qwen2_5_VLConfig, initializer_range, text, vision)


def build_tiny_qwen2_5_vl(
    out_dir: str | os.PathLike, initializer_range: float = DEFAULT_INITIALIZER_RANGE, seed: int = DEFAULT_SEED
) -> None:
    """Write a tiny Qwen2.5-VL checkpoint (model + processor) to ``out_dir``; same seed, same weights."""
    write_tiny_lmm(
        out_dir,
        Qwen2_5_VLForConditionalGeneration,
        tiny_qwen2_5_vl_config(initializer_range),
        build_tiny_qwen2_5_vl_processor(),
        seed,
    )


# The released Qwen3-VL Instruct template for system / user / assistant turns (tool calls left out): unlike
# Qwen2.5-VL there is no default system turn.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen3_vl_processor() -> Qwen3VLProcessor:
    # Qwen3-VL: 16-px patches, 2x2 merge (32-px tokens), mean/std 0.5 as in the released preprocessor.
    image_kwargs = dict(
        min_pixels=TINY_MIN_PIXELS,
        max_pixels=TINY_MAX_PIXELS,
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_kwargs = {k: v for k, v in image_kwargs.items() if k not in ("min_pixels", "max_pixels")}
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**image_kwargs),
        tokenizer=build_qwen3_vl_tokenizer(),
        video_processor=Qwen3VLVideoProcessor(**video_kwargs),
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )


def tiny_qwen3_vl_config(initializer_range: float = DEFAULT_INITIALIZER_RANGE) -> Qwen3VLConfig:
    """Qwen3-VL-2B's architecture scaled down (``tiny_qwen_vl_config``), head_dim 16; a 3-block vision tower
    over 16-px patches whose first two blocks feed the first two decoder layers (DeepStack)."""
    head_dim = 16
    # Interleaved M-RoPE over head_dim/2 frequencies, (temporal, height, width) like the released 24:20:20.
    mrope_section = [4, 2, 2]
    assert sum(mrope_section) == head_dim // 2
    text = dict(
        head_dim=head_dim,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": mrope_section,
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        depth=3,
        hidden_act="gelu_pytorch_tanh",
        patch_size=16,
        num_position_embeddings=144,  # a 12x12 learned position grid, resampled to each image
        deepstack_visual_indexes=[0, 1],
    )
    return tiny_qwen_vl_config(Qwen3VLConfig, initializer_range, text, vision)


def build_tiny_qwen3_vl(
    out_dir: str | os.PathLike, initializer_range: float = DEFAULT_INITIALIZER_RANGE, seed: int = DEFAULT_SEED
) -> None:
    """Write a tiny Qwen3-VL checkpoint (model + processor) to ``out_dir``; same seed, same weights."""
    write_tiny_lmm(
        out_dir,
        Qwen3VLForConditionalGeneration,
        tiny_qwen3_vl_config(initializer_range),
        build_tiny_qwen3_vl_processor(),
        seed,
    )


def tiny_qwen2_text_config(initializer_range: float = DEFAULT_INITIALIZER_RANGE) -> dict[str, Any]:
    """The tiny Qwen2 decoder the tiny InternVL and LLaVA-OneVision share: 4 layers x 4 heads on 2 kv heads,
    hidden 64, the real Qwen2.5 vocabulary."""
    return dict(
        model_type="qwen2",
        vocab_size=QWEN2_5_VL_VOCAB_SIZE,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=TINY_TEXT_HEADS,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        initializer_range=initializer_range,
        bos_token_id=151643,
        eos_token_id=151645,
        dtype="float32",
    )
