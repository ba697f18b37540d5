"""Tiny LLaVA-1.5 and LLaVA-NeXT: a CLIP tower and a LLaMA decoder scaled down, a small LLaMA-style BPE."""

from __future__ import annotations

import os
from typing import Any

from transformers import (
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
)

from flmm_lightning.assets.store import DEFAULT_INITIALIZER_RANGE, DEFAULT_SEED, write_tiny_lmm
from flmm_lightning.assets.text_tokenizers import build_llama_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The tower's input side: 336 px in the release, 112 here (8x8 patches of 14 px).
TINY_LLAVA_SIDE = 112
# The released LLaVA-NeXT pinpoints (multiples of 336) scaled to the tiny tower's 112 px.
TINY_LLAVA_NEXT_PINPOINTS = [[112, 224], [224, 112], [224, 224], [336, 112], [112, 336]]

# llava-hf's Vicuna template: "USER: <image>\n<text> ASSISTANT:" (LLaVA-1.5 and LLaVA-NeXT Vicuna).
LLAVA_VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def tiny_llama_text_config(vocab_size: int, initializer_range: float) -> dict[str, Any]:
    """Vicuna-7B's architecture (LLaMA) scaled down: 4 layers, 4 heads on 2 kv heads, hidden 64."""
    return dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        initializer_range=initializer_range,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
    )


def _tiny_clip_vision_config(initializer_range: float) -> dict[str, Any]:
    """CLIP ViT-L/14-336's architecture scaled down: 2 layers, hidden 64, 112 px in 14-px patches."""
    return dict(
        model_type="clip_vision_model",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_LLAVA_SIDE,
        patch_size=14,
        projection_dim=64,
        hidden_act="quick_gelu",
        initializer_range=initializer_range,
    )


def tiny_llava_config(
    tokenizer: LlamaTokenizer, initializer_range: float = DEFAULT_INITIALIZER_RANGE, anyres: bool = False
) -> LlavaConfig | LlavaNextConfig:
    """LLaVA-1.5 (or, ``anyres``, LLaVA-NeXT) with the tiny CLIP tower and LLaMA decoder above, for
    ``tokenizer``'s vocabulary and image token."""
    common = dict(
        text_config=tiny_llama_text_config(len(tokenizer), initializer_range),
        vision_config=_tiny_clip_vision_config(initializer_range),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(TINY_LLAVA_SIDE // 14) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    if anyres:
        return LlavaNextConfig(**common, image_grid_pinpoints=TINY_LLAVA_NEXT_PINPOINTS)
    return LlavaConfig(**common)


def build_tiny_llava_processor(
    tokenizer: LlamaTokenizer, anyres: bool = False
) -> LlavaProcessor | LlavaNextProcessor:
    image_kwargs = dict(
        size={"shortest_edge": TINY_LLAVA_SIDE},
        crop_size={"height": TINY_LLAVA_SIDE, "width": TINY_LLAVA_SIDE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    if anyres:
        image_processor = LlavaNextImageProcessor(
            **image_kwargs, image_grid_pinpoints=TINY_LLAVA_NEXT_PINPOINTS
        )
    else:
        image_processor = LlavaImageProcessor(**image_kwargs)
    return (LlavaNextProcessor if anyres else LlavaProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_VICUNA_CHAT_TEMPLATE,
    )


def build_tiny_llava(
    out_dir: str | os.PathLike,
    initializer_range: float = DEFAULT_INITIALIZER_RANGE,
    seed: int = DEFAULT_SEED,
    anyres: bool = False,
) -> None:
    """Write a tiny LLaVA-1.5 (or, ``anyres``, LLaVA-NeXT) checkpoint (model + processor) to ``out_dir``."""
    tokenizer = build_llama_tokenizer("<image>")
    write_tiny_lmm(
        out_dir,
        LlavaNextForConditionalGeneration if anyres else LlavaForConditionalGeneration,
        tiny_llava_config(tokenizer, initializer_range, anyres=anyres),
        build_tiny_llava_processor(tokenizer, anyres=anyres),
        seed,
    )
