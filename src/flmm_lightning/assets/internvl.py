"""Tiny InternVL3: an InternViT tower and a Qwen2 decoder scaled down, with Qwen's real BPE."""

from __future__ import annotations

import os

from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    Qwen2Tokenizer,
)

from flmm_lightning.assets.qwen import tiny_qwen2_text_config
from flmm_lightning.assets.store import DEFAULT_INITIALIZER_RANGE, DEFAULT_SEED, write_tiny_lmm
from flmm_lightning.assets.text_tokenizers import build_qwen2_5_tokenizer_with

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The tile side: 448 px in the release, 112 here (8x8 patches of 14 px, 4x4 tokens after the pixel shuffle).
TINY_INTERNVL_TILE = 112
# At most 4 tiles (the release: 12), plus the thumbnail whenever there is more than one.
TINY_INTERNVL_MAX_TILES = 4
# Named image tokens as the released ``-hf`` tokenizers name them; <img>, </img> and <IMG_CONTEXT> land on
# the released ids (151665-151667) after Qwen2.5's added tokens; <video> is the tiny's own next id.
INTERNVL_IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
INTERNVL_IMAGE_TOKEN_ID = 151667

# The released InternVL3 ``-hf`` template's shape (Qwen chat turns, the image as "<IMG_CONTEXT>\n" before
# the text), with a short English system turn in place of the released one.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are InternVL, a multimodal assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_internvl_tokenizer() -> Qwen2Tokenizer:
    """Qwen2.5's tokenizer plus InternVL's image tokens, named as the processor reads them
    (``tokenizer.start_image_token`` ...)."""
    tokenizer = build_qwen2_5_tokenizer_with(INTERNVL_IMAGE_TOKENS)
    if tokenizer.context_image_token_id != INTERNVL_IMAGE_TOKEN_ID:
        raise RuntimeError(f"<IMG_CONTEXT> got id {tokenizer.context_image_token_id}")
    return tokenizer


def tiny_internvl_config(initializer_range: float = DEFAULT_INITIALIZER_RANGE) -> InternVLConfig:
    """InternVL3-1B's architecture scaled down: a 2-block InternViT 64 wide over 112-px tiles in 14-px
    patches, a 2x2 pixel shuffle (16 tokens per tile), and a Qwen2 decoder of 4 layers x 4 heads on 2 kv
    heads, hidden 64."""
    cells = TINY_INTERNVL_TILE // 14 // 2
    return InternVLConfig(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_INTERNVL_TILE,
            patch_size=14,
            initializer_range=initializer_range,
        ),
        text_config=tiny_qwen2_text_config(initializer_range),
        image_token_id=INTERNVL_IMAGE_TOKEN_ID,
        image_seq_length=cells * cells,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        dtype="float32",
    )


def build_tiny_internvl_processor() -> InternVLProcessor:
    image_processor = GotOcr2ImageProcessor(
        size={"height": TINY_INTERNVL_TILE, "width": TINY_INTERNVL_TILE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=TINY_INTERNVL_MAX_TILES,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    cells = TINY_INTERNVL_TILE // 14 // 2
    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=build_internvl_tokenizer(),
        video_processor=InternVLVideoProcessor(
            size={"height": TINY_INTERNVL_TILE, "width": TINY_INTERNVL_TILE},
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
        ),
        image_seq_length=cells * cells,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )


def build_tiny_internvl(
    out_dir: str | os.PathLike, initializer_range: float = DEFAULT_INITIALIZER_RANGE, seed: int = DEFAULT_SEED
) -> None:
    """Write a tiny InternVL3 checkpoint (model + processor) to ``out_dir``; same seed, same weights."""
    write_tiny_lmm(
        out_dir,
        InternVLForConditionalGeneration,
        tiny_internvl_config(initializer_range),
        build_tiny_internvl_processor(),
        seed,
    )
