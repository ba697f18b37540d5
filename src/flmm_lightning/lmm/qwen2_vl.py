"""Qwen2-VL / Qwen2.5-VL: prompt building (dataloader side) and the frozen-model adapter (module side)."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from flmm_lightning.boundaries import GroundingSample, LMMBatch
from flmm_lightning.lmm import compat
from flmm_lightning.lmm.hf import HFGroundingAdapter
from flmm_lightning.lmm.packed_attention import PackedVisionAttention
from flmm_lightning.lmm.prompting import DEFAULT_INSTRUCTION, ChatPromptBuilder, EncodedImage


class Qwen2VLPromptBuilder(ChatPromptBuilder):
    """Chat prompt (system, user: image + instruction, generation prompt), then each utterance's own tokens.

    Pixel limits, so that an oversized image never reaches the model: the processor downscales an image above
    ``max_pixels`` (aspect ratio kept, sides a multiple of 28) and upscales one below ``min_pixels``; the
    builder warns once when it downscales. An image more than 200 times wider than tall (or the reverse) is
    refused with the sample named.

    ``use_fast`` defaults to ``False``: the PIL image processor, which the reference's transformers used.
    """

    fewer_image_tokens_hint = "lower model.prompt.max_pixels"

    def __init__(
        self,
        pretrained: str | os.PathLike,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        max_length: int | None = None,
        use_fast: bool | None = False,
    ) -> None:
        super().__init__(pretrained, instruction=instruction, max_length=max_length, use_fast=use_fast)
        self.max_pixels = max_pixels
        self.min_pixels = min_pixels
        self._size: dict[str, int] | None = None
        self._warned_downscale = False

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_size"] = None
        return state

    def _configure(self, processor: Any) -> None:
        default_size = processor.image_processor.size
        # Passed per call: the image processor's min/max_pixels constructor arguments are deprecated.
        self._size = {
            "shortest_edge": self.min_pixels if self.min_pixels is not None else default_size.shortest_edge,
            "longest_edge": self.max_pixels if self.max_pixels is not None else default_size.longest_edge,
        }

    def _resized_hw(self, sample: GroundingSample) -> tuple[int, int]:
        """The processor's size for this image (its ``smart_resize``), with the sample named on refusal."""
        image_processor = self.processor.image_processor
        try:
            return compat.smart_resize(
                sample.image.height,
                sample.image.width,
                factor=image_processor.patch_size * image_processor.merge_size,
                min_pixels=self._size["shortest_edge"],
                max_pixels=self._size["longest_edge"],
            )
        except ValueError as error:
            raise ValueError(f"sample {sample.image_id} ({sample.file_name}): {error}") from error

    def _image_tokens(self, sample: GroundingSample) -> int:
        height, width = self._resized_hw(sample)
        factor = self.processor.image_processor.patch_size * self.processor.image_processor.merge_size
        return (height // factor) * (width // factor)

    def _warn_if_downscaled(self, sample: GroundingSample) -> None:
        """Once per builder (per dataloader worker): COCO-sized images stay under the default cap."""
        pixels = sample.image.width * sample.image.height
        if self._warned_downscale or pixels <= self._size["longest_edge"]:
            return
        self._warned_downscale = True
        height, width = self._resized_hw(sample)
        warnings.warn(
            f"sample {sample.image_id} ({sample.file_name}): {sample.image.width}x{sample.image.height} "
            f"pixels exceed model.prompt.max_pixels={self._size['longest_edge']}; the LMM sees it downscaled "
            f"to {width}x{height} (masks stay at full size; warned once, other large images are downscaled "
            "the same way)",
            stacklevel=4,
        )

    def _encode_image(self, sample: GroundingSample, prompt: str) -> EncodedImage:
        processor = self.processor
        self._warn_if_downscaled(sample)
        encoded = processor(images=[sample.image], text=[prompt], size=self._size, return_tensors="pt")
        image_grid_thw = encoded["image_grid_thw"]  # [1, 3]
        _, grid_h, grid_w = (int(v) for v in image_grid_thw[0])
        merge = processor.image_processor.merge_size
        patch = processor.image_processor.patch_size
        height, width = grid_h * patch, grid_w * patch
        return EncodedImage(
            prompt_ids=encoded["input_ids"][0],
            pixel_inputs={"pixel_values": encoded["pixel_values"], "image_grid_thw": image_grid_thw},
            grid_hw=(grid_h // merge, grid_w // merge),
            # Qwen resizes to a multiple of patch*merge and never pads: the grid covers exactly the image.
            padded_hw=(height, width),
            content_box=(0, 0, height, width),
        )


class PackedQwen2VLVisionAttention(PackedVisionAttention, compat.Qwen2VLVisionAttention):
    """Qwen2-VL's vision attention with every image in one SDPA call (``packed_attention``)."""

    apply_rotary = staticmethod(compat.qwen2_vl_rotary)


class PackedQwen2_5VLVisionAttention(PackedVisionAttention, compat.Qwen2_5_VLVisionAttention):
    """Qwen2.5-VL's vision attention with every image and window in one SDPA call (``packed_attention``)."""

    apply_rotary = staticmethod(compat.qwen2_5_vl_rotary)


class Qwen2VLAdapter(HFGroundingAdapter):
    """A frozen Qwen2-VL / Qwen2.5-VL read out as phrase-token attention maps and projected hidden states.

    Image tokens are row-major over the merged grid (the vision tower undoes its window order).
    """

    model_types = ("qwen2_vl", "qwen2_5_vl")
    packed_vision_attention: dict[type[nn.Module], type[nn.Module]] = {
        compat.Qwen2VLVisionAttention: PackedQwen2VLVisionAttention,
        compat.Qwen2_5_VLVisionAttention: PackedQwen2_5VLVisionAttention,
    }

    def _pixel_inputs(
        self, batch: LMMBatch, image_tokens: torch.Tensor, device: torch.device
    ) -> dict[str, torch.Tensor]:
        return {
            **super()._pixel_inputs(batch, image_tokens, device),  # pixel_values, image_grid_thw
            # Text 0 / image 1, as the processor returns it: M-RoPE needs it to lay image tokens on a 2D grid.
            "mm_token_type_ids": image_tokens.long(),
        }
