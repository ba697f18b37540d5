"""Offline tiny models for the demo and the tests, built deterministically on first use.

The tiny LMMs are real-architecture Qwen2.5-VL, Qwen3-VL, LLaVA-1.5, LLaVA-NeXT, DeepSeek-VL, InternVL3,
LLaVA-OneVision and Gemma 3 (random weights; real tokenizer formats, chat templates and image processors)
written with ``save_pretrained``, so that everything downstream loads them through the same
``from_pretrained(local_dir)`` path a downloaded checkpoint takes. Nothing here touches the network.

``store``: the cache folder and atomic builds; ``text_tokenizers``; one module per family (``qwen``,
``llava``, ``deepseek``, ``internvl``, ``onevision``, ``gemma``, ``sam``); ``catalog``: the assets by name
(``asset_path``, ``ensure_asset``).
``python -m flmm_lightning.assets`` builds them all.
"""

from flmm_lightning.assets.catalog import (
    ASSETS,
    TINY_DEEPSEEK_VL,
    TINY_DEEPSEEK_VL_HYBRID,
    TINY_GEMMA3,
    TINY_INTERNVL,
    TINY_LLAVA,
    TINY_LLAVA_NEXT,
    TINY_LLAVA_ONEVISION,
    TINY_LMMS,
    TINY_QWEN2_5_VL,
    TINY_QWEN3_VL,
    TinyLMMRecipe,
    asset_path,
    ensure_asset,
    ensure_tiny_deepseek_vl,
    ensure_tiny_deepseek_vl_hybrid,
    ensure_tiny_gemma3,
    ensure_tiny_internvl,
    ensure_tiny_llava,
    ensure_tiny_llava_next,
    ensure_tiny_llava_onevision,
    ensure_tiny_lmm,
    ensure_tiny_qwen2_5_vl,
    ensure_tiny_qwen3_vl,
)
from flmm_lightning.assets.deepseek import (
    DEEPSEEK_IMAGE_TOKEN,
    DEEPSEEK_SYSTEM_PROMPT,
    DEEPSEEK_VL_CHAT_TEMPLATE,
    build_tiny_deepseek_vl,
    build_tiny_deepseek_vl_processor,
    tiny_deepseek_vl_config,
)
from flmm_lightning.assets.gemma import build_tiny_gemma3, tiny_gemma3_config
from flmm_lightning.assets.internvl import build_tiny_internvl, tiny_internvl_config
from flmm_lightning.assets.llava import (
    CLIP_MEAN,
    CLIP_STD,
    LLAVA_VICUNA_CHAT_TEMPLATE,
    build_tiny_llava,
    build_tiny_llava_processor,
    tiny_llava_config,
)
from flmm_lightning.assets.onevision import build_tiny_llava_onevision, tiny_llava_onevision_config
from flmm_lightning.assets.qwen import (
    QWEN2_5_VL_CHAT_TEMPLATE,
    QWEN2_5_VL_VOCAB_SIZE,
    QWEN3_VL_CHAT_TEMPLATE,
    TINY_MAX_PIXELS,
    TINY_MIN_PIXELS,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_5_vl_processor,
    build_tiny_qwen3_vl,
    build_tiny_qwen3_vl_processor,
    tiny_qwen2_5_vl_config,
    tiny_qwen3_vl_config,
)
from flmm_lightning.assets.sam import TINY_SAM, TINY_SAM_FILE, build_tiny_sam, ensure_tiny_sam
from flmm_lightning.assets.store import CACHE_ENV, DEFAULT_INITIALIZER_RANGE, DEFAULT_SEED, cache_root
from flmm_lightning.assets.text_tokenizers import (
    build_llama_tokenizer,
    build_qwen2_5_vl_tokenizer,
    build_qwen3_vl_tokenizer,
)

__all__ = [
    "ASSETS",
    "CACHE_ENV",
    "CLIP_MEAN",
    "CLIP_STD",
    "DEEPSEEK_IMAGE_TOKEN",
    "DEEPSEEK_SYSTEM_PROMPT",
    "DEEPSEEK_VL_CHAT_TEMPLATE",
    "DEFAULT_INITIALIZER_RANGE",
    "DEFAULT_SEED",
    "LLAVA_VICUNA_CHAT_TEMPLATE",
    "QWEN2_5_VL_CHAT_TEMPLATE",
    "QWEN2_5_VL_VOCAB_SIZE",
    "QWEN3_VL_CHAT_TEMPLATE",
    "TINY_DEEPSEEK_VL",
    "TINY_DEEPSEEK_VL_HYBRID",
    "TINY_GEMMA3",
    "TINY_INTERNVL",
    "TINY_LLAVA",
    "TINY_LLAVA_NEXT",
    "TINY_LLAVA_ONEVISION",
    "TINY_LMMS",
    "TINY_MAX_PIXELS",
    "TINY_MIN_PIXELS",
    "TINY_QWEN2_5_VL",
    "TINY_QWEN3_VL",
    "TINY_SAM",
    "TINY_SAM_FILE",
    "TinyLMMRecipe",
    "build_llama_tokenizer",
    "build_qwen2_5_vl_tokenizer",
    "build_qwen3_vl_tokenizer",
    "build_tiny_sam",
    "build_tiny_deepseek_vl",
    "build_tiny_deepseek_vl_processor",
    "build_tiny_gemma3",
    "build_tiny_internvl",
    "build_tiny_llava",
    "build_tiny_llava_onevision",
    "build_tiny_llava_processor",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen2_5_vl_processor",
    "build_tiny_qwen3_vl",
    "build_tiny_qwen3_vl_processor",
    "asset_path",
    "cache_root",
    "ensure_asset",
    "ensure_tiny_deepseek_vl",
    "ensure_tiny_deepseek_vl_hybrid",
    "ensure_tiny_gemma3",
    "ensure_tiny_internvl",
    "ensure_tiny_llava",
    "ensure_tiny_llava_next",
    "ensure_tiny_llava_onevision",
    "ensure_tiny_lmm",
    "ensure_tiny_qwen2_5_vl",
    "ensure_tiny_qwen3_vl",
    "ensure_tiny_sam",
    "tiny_deepseek_vl_config",
    "tiny_gemma3_config",
    "tiny_internvl_config",
    "tiny_llava_config",
    "tiny_llava_onevision_config",
    "tiny_qwen2_5_vl_config",
    "tiny_qwen3_vl_config",
]
