"""Frozen LMM adapters (one module per family) and attention capture.

Their boundary types are in ``flmm_lightning.boundaries``; the adapters (which import transformers) load on
first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from flmm_lightning.lmm.base import FrozenLMM

_LAZY = {
    "ChatPromptBuilder": "flmm_lightning.lmm.prompting",
    "HFGroundingAdapter": "flmm_lightning.lmm.hf",
    "Qwen2VLAdapter": "flmm_lightning.lmm.qwen2_vl",
    "Qwen2VLPromptBuilder": "flmm_lightning.lmm.qwen2_vl",
    "Qwen3VLAdapter": "flmm_lightning.lmm.qwen3_vl",
    "Qwen3VLPromptBuilder": "flmm_lightning.lmm.qwen3_vl",
    "LlavaAdapter": "flmm_lightning.lmm.llava",
    "LlavaPromptBuilder": "flmm_lightning.lmm.llava",
    "LlavaNextAdapter": "flmm_lightning.lmm.llava_next",
    "LlavaNextPromptBuilder": "flmm_lightning.lmm.llava_next",
    "DeepseekVLAdapter": "flmm_lightning.lmm.deepseek_vl",
    "DeepseekVLPromptBuilder": "flmm_lightning.lmm.deepseek_vl",
    "InternVLAdapter": "flmm_lightning.lmm.internvl",
    "InternVLPromptBuilder": "flmm_lightning.lmm.internvl",
    "LlavaOnevisionAdapter": "flmm_lightning.lmm.llava_onevision",
    "LlavaOnevisionPromptBuilder": "flmm_lightning.lmm.llava_onevision",
    "Gemma3Adapter": "flmm_lightning.lmm.gemma3",
    "Gemma3PromptBuilder": "flmm_lightning.lmm.gemma3",
    "AttentionCapture": "flmm_lightning.lmm.capture",
    "build_capture": "flmm_lightning.lmm.capture",
}

__all__ = ["FrozenLMM", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
