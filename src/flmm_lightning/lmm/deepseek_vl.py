"""DeepSeek-VL (``DeepseekVLForConditionalGeneration``, 1.3B) and its hybrid (``DeepseekVLHybrid...``, 7B).

The processor resizes the longer side to the tower's size (384 px; the hybrid's 1024-px SAM branch first,
its padded square then shrunk to 384 for SigLIP) and pads to a centred square in the mean colour, so the tower
sees the whole image. Each image becomes ``num_image_tokens`` placeholder tokens (576), the row-major cells
of a 24x24 grid over the square; in the hybrid the two towers' features are fused per cell, so the grid is the
same. ``content_box`` says where the image lies in the square, so the shared head crops the coarse mask.
"""

from __future__ import annotations

import math
from typing import Any

from flmm_lightning.boundaries import GroundingSample
from flmm_lightning.lmm.hf import HFGroundingAdapter
from flmm_lightning.lmm.prompting import ChatPromptBuilder, EncodedImage

HIGH_RES_PIXELS = "high_res_pixel_values"


class DeepseekVLPromptBuilder(ChatPromptBuilder):
    """Chat prompt (the DeepSeek conversation: system text, ``User: <image><instruction>``, ``Assistant:``),
    then the utterances."""

    processor_classes = ("DeepseekVLProcessor", "DeepseekVLHybridProcessor")

    def _configure(self, processor: Any) -> None:
        side = math.isqrt(processor.num_image_tokens)
        if side * side != processor.num_image_tokens:
            raise ValueError(
                f"{self.pretrained}: {processor.num_image_tokens} image tokens do not make a square grid"
            )

    def _image_tokens(self, sample: GroundingSample) -> int:
        return self.processor.num_image_tokens

    def content_box(self, height: int, width: int) -> tuple[int, tuple[int, int, int, int]]:
        """The padded square's side and the ``(top, left, height, width)`` of a ``height`` x ``width`` image
        in it, as the image processor resizes and pads (the hybrid's low-res square is its high-res one
        shrunk)."""
        image_processor = self.processor.image_processor
        size = getattr(image_processor, "high_res_size", None) or image_processor.size
        side = size["height"]
        scale = side / max(height, width)
        # Python's round, as the image processor (ties to even).
        resized_h = max(round(height * scale), image_processor.min_size)
        resized_w = max(round(width * scale), image_processor.min_size)
        return side, ((side - resized_h) // 2, (side - resized_w) // 2, resized_h, resized_w)

    def _encode_image(self, sample: GroundingSample, prompt: str) -> EncodedImage:
        encoded = self.processor(images=[sample.image], text=[prompt], return_tensors="pt")
        pixel_inputs = {"pixel_values": encoded["pixel_values"]}  # [1, 3, 384, 384]
        if HIGH_RES_PIXELS in encoded:
            pixel_inputs[HIGH_RES_PIXELS] = encoded[HIGH_RES_PIXELS]  # [1, 3, 1024, 1024]
        side, box = self.content_box(sample.image.height, sample.image.width)
        cells = math.isqrt(self.processor.num_image_tokens)  # a square grid, checked when the processor loads
        return EncodedImage(
            prompt_ids=encoded["input_ids"][0],
            pixel_inputs=pixel_inputs,
            grid_hw=(cells, cells),
            padded_hw=(side, side),
            content_box=box,
        )


class DeepseekVLAdapter(HFGroundingAdapter):
    """A frozen DeepSeek-VL (plain or hybrid) read out as phrase-token attention maps and hidden states."""

    model_types = ("deepseek_vl", "deepseek_vl_hybrid")
