"""Tiny LLaVA-OneVision: a SigLIP tower and a Qwen2 decoder scaled down, with Qwen's real BPE."""

from __future__ import annotations

import os

from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
)

from flmm_lightning.assets.qwen import tiny_qwen2_text_config
from flmm_lightning.assets.store import DEFAULT_INITIALIZER_RANGE, DEFAULT_SEED, write_tiny_lmm
from flmm_lightning.assets.text_tokenizers import build_qwen2_5_tokenizer_with

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
# The tower's input side: 384 px in the release, 112 here (8x8 patches of 14 px).
TINY_ONEVISION_SIDE = 112
# The released pinpoints (384 x 1..6 on each side) scaled to the tiny tower's 112 px.
TINY_ONEVISION_PINPOINTS = [
    [TINY_ONEVISION_SIDE * i, TINY_ONEVISION_SIDE * j] for i in range(1, 7) for j in range(1, 7)
]
# After Qwen2.5's added tokens (the release, on Qwen2's tokenizer: 151646 and 151647).
ONEVISION_IMAGE_TOKENS = {"image_token": "<image>", "video_token": "<video>"}

# The released template's shape: the role, a space, the image placeholder(s), then a newline and the text.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_llava_onevision_config(initializer_range: float = DEFAULT_INITIALIZER_RANGE) -> LlavaOnevisionConfig:
    """LLaVA-OneVision-0.5B's architecture scaled down: a 2-layer SigLIP tower 64 wide over 112-px crops in
    14-px patches (8x8 tokens per crop, all kept), any-res up to 6x6 crops with the released ``anyres_max_9``
    pooling, and a Qwen2 decoder of 4 layers x 4 heads on 2 kv heads, hidden 64."""
    tokenizer = build_qwen2_5_tokenizer_with(ONEVISION_IMAGE_TOKENS)
    return LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_ONEVISION_SIDE,
            patch_size=14,
            initializer_range=initializer_range,
        ),
        text_config=tiny_qwen2_text_config(initializer_range),
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=TINY_ONEVISION_PINPOINTS,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
        dtype="float32",
    )


def build_tiny_llava_onevision_processor() -> LlavaOnevisionProcessor:
    side = {"height": TINY_ONEVISION_SIDE, "width": TINY_ONEVISION_SIDE}
    normalise = dict(image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD))
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=side, image_grid_pinpoints=TINY_ONEVISION_PINPOINTS, **normalise
        ),
        tokenizer=build_qwen2_5_tokenizer_with(ONEVISION_IMAGE_TOKENS),
        video_processor=LlavaOnevisionVideoProcessor(size=side, **normalise),
        num_image_tokens=(TINY_ONEVISION_SIDE // 14) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )


def build_tiny_llava_onevision(
    out_dir: str | os.PathLike, initializer_range: float = DEFAULT_INITIALIZER_RANGE, seed: int = DEFAULT_SEED
) -> None:
    """Write a tiny LLaVA-OneVision checkpoint (model + processor) to ``out_dir``; same seed, same weights."""
    write_tiny_lmm(
        out_dir,
        LlavaOnevisionForConditionalGeneration,
        tiny_llava_onevision_config(initializer_range),
        build_tiny_llava_onevision_processor(),
        seed,
    )
