"""Tiny Gemma 3: a SigLIP tower and a Gemma 3 decoder (local sliding-window and global layers) scaled down,
with a small Gemma-style BPE."""

from __future__ import annotations

import os

from tokenizers import AddedToken
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    GemmaTokenizer,
)

from flmm_lightning.assets.store import DEFAULT_INITIALIZER_RANGE, DEFAULT_SEED, write_tiny_lmm
from flmm_lightning.assets.text_tokenizers import train_caption_bpe

# Gemma's first ids (<pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4), then the 256 byte-fallback pieces.
GEMMA_BASE_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *(f"<0x{b:02X}>" for b in range(256)))
GEMMA_TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")
GEMMA_IMAGE_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}
# The tower's input side: 896 px in the release, 224 here (16x16 patches of 14 px, pooled 2x2 to 8x8 tokens).
TINY_GEMMA3_SIDE = 224
TINY_GEMMA3_TOKENS_PER_IMAGE = 64
# Released Gemma 3: five local (sliding-window) layers, then one global layer. The tiny window is short, so
# that the phrase tokens of the tests lie beyond it from the first image tokens.
TINY_GEMMA3_LAYER_TYPES = ["sliding_attention"] * 5 + ["full_attention"]
TINY_GEMMA3_SLIDING_WINDOW = 64

# The released template's shape: BOS, turns as "<start_of_turn>{user|model}\n...<end_of_turn>\n", the image
# as <start_of_image> (the processor expands it), trimmed text.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_gemma_tokenizer() -> GemmaTokenizer:
    """A small BPE with byte fallback over Gemma's first ids (BOS added, no space prefix, as Gemma's), then
    the turn markers and the named image tokens (``tokenizer.boi_token`` ...) as added special tokens."""
    vocab, merges = train_caption_bpe(GEMMA_BASE_TOKENS)
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=True,
        padding_side="right",
        extra_special_tokens=GEMMA_IMAGE_TOKENS,
    )
    tokenizer.add_tokens([AddedToken(text, special=True, normalized=False) for text in GEMMA_TURN_TOKENS])
    return tokenizer


def tiny_gemma3_config(initializer_range: float = DEFAULT_INITIALIZER_RANGE) -> Gemma3Config:
    """Gemma 3 4B's architecture scaled down: a 2-layer SigLIP tower 64 wide over 224-px images (16x16
    patches average-pooled to 8x8 image tokens), and a decoder of 6 layers (5 sliding-window, 1 global) x 4
    heads on 2 kv heads, head_dim 16, hidden 64, QK-norm, bidirectional attention among image tokens."""
    tokenizer = build_gemma_tokenizer()
    head_dim = 16
    return Gemma3Config(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_GEMMA3_SIDE,
            patch_size=14,
            vision_use_head=False,
        ),
        text_config=dict(
            model_type="gemma3_text",
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=len(TINY_GEMMA3_LAYER_TYPES),
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            layer_types=TINY_GEMMA3_LAYER_TYPES,
            sliding_window=TINY_GEMMA3_SLIDING_WINDOW,
            max_position_embeddings=4096,
            initializer_range=initializer_range,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")],
            dtype="float32",
        ),
        mm_tokens_per_image=TINY_GEMMA3_TOKENS_PER_IMAGE,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
        initializer_range=initializer_range,
        dtype="float32",
    )


def build_tiny_gemma3_processor() -> Gemma3Processor:
    image_processor = Gemma3ImageProcessor(
        size={"height": TINY_GEMMA3_SIDE, "width": TINY_GEMMA3_SIDE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=build_gemma_tokenizer(),
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=TINY_GEMMA3_TOKENS_PER_IMAGE,
    )


def build_tiny_gemma3(
    out_dir: str | os.PathLike, initializer_range: float = DEFAULT_INITIALIZER_RANGE, seed: int = DEFAULT_SEED
) -> None:
    """Write a tiny Gemma 3 checkpoint (model + processor) to ``out_dir``; same seed, same weights."""
    write_tiny_lmm(
        out_dir,
        Gemma3ForConditionalGeneration,
        tiny_gemma3_config(initializer_range),
        build_tiny_gemma3_processor(),
        seed,
    )
