"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's any-res read-out, SigLIP crops.

The image token layout is LLaVA-NeXT's: the base image (the whole image squashed to the tower's 384 px, a
27x27 grid for SigLIP-so400m/14), then the any-res grid (crops at the best of ``image_grid_pinpoints``,
multiples of 384 up to 2304 px, padding removed by the model) with a newline token ending each row. One
difference: under the released ``vision_aspect_ratio="anyres_max_9"`` the model shrinks an any-res grid of
more than about 9 crops' worth of cells (bilinearly, by ``sqrt(cells / (9 * 729))``) before the newlines are
added, and the processor counts tokens the same way. The adapter is LLaVA-NeXT's: the newline column dropped,
the base maps resized bilinearly onto the (possibly shrunk) any-res grid and stacked before it (2·L·H
channels); the grid covers the unpadded image, so the coarse mask needs no crop.
"""

from __future__ import annotations

import math

from flmm_lightning.lmm.llava_next import LlavaNextAdapter, LlavaNextPromptBuilder


class LlavaOnevisionPromptBuilder(LlavaNextPromptBuilder):
    """Chat prompt (the checkpoint's Qwen2 template), then the utterances."""

    processor_classes = ("LlavaOnevisionProcessor",)

    def crop_geometry(self) -> tuple[int, int]:
        # No crop_size and no patch_size here: crops are ``size`` squares, ``num_image_tokens`` tokens each.
        processor = self.processor
        side = processor.image_processor.size["height"]
        return side, side // math.isqrt(processor.num_image_tokens)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """A frozen LLaVA-OneVision read out as base- and any-res-grid attention maps and projected hidden
    states."""

    model_types = ("llava_onevision",)
