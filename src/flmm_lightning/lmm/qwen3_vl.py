"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): the Qwen2-VL builder and adapter, checked for the family.

What differs from Qwen2/2.5-VL, and why nothing else needs overriding:

- processor: ``Qwen3VLProcessor`` over the same ``Qwen2VLImageProcessor`` with 16-px patches (Qwen2: 14) and a
  2x2 merge, so one image token covers 32x32 px. The builder reads patch and merge sizes from the processor,
  and the grid from ``image_grid_thw // merge``.
- tokens: the same ids as Qwen2.5-VL (``<|image_pad|>`` 151655, ``<|vision_start|>`` 151652,
  ``<|vision_end|>`` 151653); the chat template has no default system turn (it comes from the processor).
- forward: M-RoPE is interleaved and needs ``mm_token_type_ids`` (the adapter passes it); DeepStack adds
  vision-tower features to the image positions of the first decoder layers inside the model, from
  ``visual_pos_masks`` it derives itself. The phrase tokens, whose hidden states the adapter reads, are never
  image positions, and the attention capture sees every decoder layer's self-attention as usual.
- vision attention: its own class (full attention per image, no windows), so the fast path's packed
  replacement is its own subclass too.
"""

from __future__ import annotations

from torch import nn

from flmm_lightning.lmm import compat
from flmm_lightning.lmm.packed_attention import PackedVisionAttention
from flmm_lightning.lmm.qwen2_vl import Qwen2VLAdapter, Qwen2VLPromptBuilder


class Qwen3VLPromptBuilder(Qwen2VLPromptBuilder):
    """Chat prompt (user: image + instruction, generation prompt), then each utterance's own tokens.

    The Qwen2-VL builder as is: pixel limits round to multiples of 32 px (patch 16 x merge 2).
    """

    processor_classes = ("Qwen3VLProcessor",)


class PackedQwen3VLVisionAttention(PackedVisionAttention, compat.Qwen3VLVisionAttention):
    """Qwen3-VL's vision attention with every image in one SDPA call (``packed_attention``)."""

    apply_rotary = staticmethod(compat.qwen3_vl_rotary)


class Qwen3VLAdapter(Qwen2VLAdapter):
    """A frozen Qwen3-VL read out as phrase-token attention maps and projected hidden states."""

    model_types = ("qwen3_vl",)
    packed_vision_attention: dict[type[nn.Module], type[nn.Module]] = {
        compat.Qwen3VLVisionAttention: PackedQwen3VLVisionAttention
    }
