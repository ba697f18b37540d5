"""Tiny DeepSeek-VL and DeepSeek-VL hybrid: SigLIP (plus a SAM tower) and a LLaMA decoder scaled down."""

from __future__ import annotations

import os
from typing import Any

from transformers import (
    DeepseekVLConfig,
    DeepseekVLForConditionalGeneration,
    DeepseekVLHybridConfig,
    DeepseekVLHybridForConditionalGeneration,
    DeepseekVLHybridImageProcessor,
    DeepseekVLHybridProcessor,
    DeepseekVLImageProcessor,
    DeepseekVLProcessor,
    LlamaTokenizer,
)

from flmm_lightning.assets.llava import CLIP_MEAN, CLIP_STD, tiny_llama_text_config
from flmm_lightning.assets.store import DEFAULT_INITIALIZER_RANGE, DEFAULT_SEED, write_tiny_lmm
from flmm_lightning.assets.text_tokenizers import build_llama_tokenizer

DEEPSEEK_IMAGE_TOKEN = "<image_placeholder>"
# SigLIP's side: 384 px in the release (24x24 patches of 16 px), 128 here (8x8); the hybrid's SAM side: 1024
# in the release, 256 here.
TINY_DEEPSEEK_SIDE = 128
TINY_DEEPSEEK_HIGH_RES_SIDE = 256
DEEPSEEK_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
# DeepSeek-VL's conversation format: the system text, then "User: <content>" and "Assistant: <content>" turns
# separated by a blank line (an assistant turn ends with EOS instead), then "Assistant:" to generate.
DEEPSEEK_VL_CHAT_TEMPLATE = (
    "{{ '" + DEEPSEEK_SYSTEM_PROMPT + "' + '\\n\\n' }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize + ': ' }}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '" + DEEPSEEK_IMAGE_TOKEN + "' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] | trim }}{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _tiny_siglip_vision_config(initializer_range: float) -> dict[str, Any]:
    """SigLIP-L/16-384's architecture scaled down: 2 layers, hidden 64, 128 px in 16-px patches."""
    return dict(
        model_type="siglip_vision_model",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_DEEPSEEK_SIDE,
        patch_size=16,
        vision_use_head=False,
        initializer_range=initializer_range,
    )


def _tiny_deepseek_image_processor(hybrid: bool) -> Any:
    # The released 1.3B and the hybrid's SigLIP branch normalise with mean = std = 0.5; the SAM branch with
    # CLIP's statistics.
    low_res = dict(
        size={"height": TINY_DEEPSEEK_SIDE, "width": TINY_DEEPSEEK_SIDE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    if not hybrid:
        return DeepseekVLImageProcessor(**low_res)
    return DeepseekVLHybridImageProcessor(
        **low_res,
        high_res_size={"height": TINY_DEEPSEEK_HIGH_RES_SIDE, "width": TINY_DEEPSEEK_HIGH_RES_SIDE},
        high_res_image_mean=list(CLIP_MEAN),
        high_res_image_std=list(CLIP_STD),
    )


def build_tiny_deepseek_vl_processor(
    tokenizer: LlamaTokenizer, hybrid: bool = False
) -> DeepseekVLProcessor | DeepseekVLHybridProcessor:
    processor_class = DeepseekVLHybridProcessor if hybrid else DeepseekVLProcessor
    return processor_class(
        image_processor=_tiny_deepseek_image_processor(hybrid),
        tokenizer=tokenizer,
        chat_template=DEEPSEEK_VL_CHAT_TEMPLATE,
        num_image_tokens=(TINY_DEEPSEEK_SIDE // 16) ** 2,
    )


def tiny_deepseek_vl_config(
    tokenizer: LlamaTokenizer, initializer_range: float = DEFAULT_INITIALIZER_RANGE, hybrid: bool = False
) -> DeepseekVLConfig | DeepseekVLHybridConfig:
    """DeepSeek-VL-1.3B (or, ``hybrid``, 7B)'s architecture scaled down, for ``tokenizer``'s vocabulary: a
    LLaMA decoder of 4 layers x 4 heads; SigLIP at 128 px (an 8x8 grid); the hybrid adds a 2-layer SAM tower
    at 256 px fused onto the same grid."""
    common = dict(
        text_config=tiny_llama_text_config(len(tokenizer), initializer_range),
        vision_config=_tiny_siglip_vision_config(initializer_range),
        image_token_id=tokenizer.convert_tokens_to_ids(DEEPSEEK_IMAGE_TOKEN),
        tie_word_embeddings=False,
        dtype="float32",
    )
    if not hybrid:
        return DeepseekVLConfig(**common)
    high_res = dict(
        model_type="sam_vision_model",
        hidden_size=32,
        output_channels=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_dim=64,
        image_size=TINY_DEEPSEEK_HIGH_RES_SIDE,
        patch_size=16,
        window_size=4,
        global_attn_indexes=[1],
        initializer_range=initializer_range,
    )
    return DeepseekVLHybridConfig(**common, high_res_vision_config=high_res)


def build_tiny_deepseek_vl(
    out_dir: str | os.PathLike,
    initializer_range: float = DEFAULT_INITIALIZER_RANGE,
    seed: int = DEFAULT_SEED,
    hybrid: bool = False,
) -> None:
    """Write a tiny DeepSeek-VL (or hybrid) checkpoint (model + processor) to ``out_dir``."""
    model_class = DeepseekVLHybridForConditionalGeneration if hybrid else DeepseekVLForConditionalGeneration
    tokenizer = build_llama_tokenizer(DEEPSEEK_IMAGE_TOKEN)
    write_tiny_lmm(
        out_dir,
        model_class,
        tiny_deepseek_vl_config(tokenizer, initializer_range, hybrid=hybrid),
        build_tiny_deepseek_vl_processor(tokenizer, hybrid=hybrid),
        seed,
    )
