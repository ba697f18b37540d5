"""DeepSeek-VL (``DeepseekVLForConditionalGeneration``, 1.3B) and its hybrid (``DeepseekVLHybrid...``, 7B).

The longer side is resized to the tower's size (384 px; the hybrid's 1024-px SAM branch, its padded
square then shrunk to 384 for SigLIP) and the image centred on a square in the mean colour, so the tower sees
the whole image; done here as the reference does it (sizes truncated, PIL bicubic; the hybrid's shrinking
bilinear, as its tower does), the processor only tokenises (and, plain, rescales and normalises). Each image
becomes ``num_image_tokens`` placeholder tokens (576), the row-major cells
of a 24x24 grid over the square; in the hybrid the two towers' features are fused per cell, so the grid is the
same. ``content_box`` says where the image lies in the square, so the shared head crops the coarse mask.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers.models.siglip.modeling_siglip import SiglipMLP

from flmm_lightning.boundaries import GroundingSample
from flmm_lightning.lmm.hf import HFGroundingAdapter
from flmm_lightning.lmm.prompting import ChatPromptBuilder, EncodedImage

HIGH_RES_PIXELS = "high_res_pixel_values"
# Where the DeepSeek conversation's user turn starts (after the system text).
USER_TURN = "User:"


class DeepseekVLPromptBuilder(ChatPromptBuilder):
    """The DeepSeek conversation's user turn (``User: <image><instruction>``) and ``Assistant:``, then the
    utterances. No system text: the reference's DeepSeek-VL configs set ``SYSTEM=''`` for grounding (the
    released heads saw no system text; measured with scripts/parity). Conversations keep the template's."""

    processor_classes = ("DeepseekVLProcessor", "DeepseekVLHybridProcessor")

    def _configure(self, processor: Any) -> None:
        side = math.isqrt(processor.num_image_tokens)
        if side * side != processor.num_image_tokens:
            raise ValueError(
                f"{self.pretrained}: {processor.num_image_tokens} image tokens do not make a square grid"
            )

    def _grounding_prompt(self, processor: Any, messages: list[dict[str, Any]]) -> str:
        prompt = super()._grounding_prompt(processor, messages)
        user_turn = prompt.find(USER_TURN)
        if user_turn < 0:
            raise ValueError(f"{self.pretrained}: the chat template has no {USER_TURN!r} turn: {prompt!r}")
        return prompt[user_turn:]

    def _image_tokens(self, sample: GroundingSample) -> int:
        return self.processor.num_image_tokens

    def content_box(self, height: int, width: int) -> tuple[int, tuple[int, int, int, int]]:
        """The padded square's side (the hybrid's: its high-res side) and the ``(top, left, height, width)``
        of a ``height`` x ``width`` image in it, as the reference resizes and pads."""
        image_processor = self.processor.image_processor
        side = _square_side(image_processor)
        resized_h, resized_w = reference_resized_size(height, width, side, image_processor.min_size)
        return side, ((side - resized_h) // 2, (side - resized_w) // 2, resized_h, resized_w)

    def _encode_image(self, sample: GroundingSample, prompt: str) -> EncodedImage:
        image_processor = self.processor.image_processor
        hybrid = getattr(image_processor, "high_res_size", None) is not None
        side, (top, left, height, width) = self.content_box(sample.image.height, sample.image.width)
        # The reference's resize (PIL bicubic, sizes truncated) and padding, in the mean colour of the
        # square's tower (the hybrid's: SAM's).
        mean = image_processor.high_res_image_mean if hybrid else image_processor.image_mean
        square = Image.new("RGB", (side, side), tuple(int(channel * 255) for channel in mean))
        square.paste(sample.image.resize((width, height), Image.Resampling.BICUBIC), (left, top))
        if hybrid:
            # The processor's pixels are not the reference's (it would resize the square again): only its ids
            encoded = self.processor(images=[square], text=[prompt], return_tensors="pt")
            pixel_inputs = reference_hybrid_pixels(square, image_processor)
        else:
            encoded = self.processor(
                images=[square], text=[prompt], do_resize=False, do_pad=False, return_tensors="pt"
            )
            pixel_inputs = {"pixel_values": encoded["pixel_values"]}  # [1, 3, 384, 384]
        cells = math.isqrt(self.processor.num_image_tokens)  # a square grid, checked when the processor loads
        return EncodedImage(
            prompt_ids=encoded["input_ids"][0],
            pixel_inputs=pixel_inputs,
            grid_hw=(cells, cells),
            padded_hw=(side, side),
            content_box=(top, left, height, width),
        )


def _square_side(image_processor: Any) -> int:
    high_res = getattr(image_processor, "high_res_size", None)
    return (image_processor.size if high_res is None else high_res)["height"]


def reference_hybrid_pixels(square: Image.Image, image_processor: Any) -> dict[str, torch.Tensor]:
    """The hybrid's two inputs from its padded high-res ``square``, as the reference computes them: the
    square rescaled to [0, 1] is what its processor gives; inside the model the SAM tower normalises it with
    its own statistics, and the SigLIP tower takes it resized to its side (bilinear, antialiased, on the
    [0, 1] floats) and normalised with its own."""
    # rescaled in float64, then float32, as the reference's processor
    unit = np.asarray(square, dtype=np.float64) * image_processor.rescale_factor
    unit = torch.from_numpy(unit.astype(np.float32)).permute(2, 0, 1)[None]  # [1, 3, 1024, 1024]
    low_side = image_processor.size["height"]
    low = F.interpolate(unit, size=(low_side, low_side), mode="bilinear", align_corners=False, antialias=True)

    def normalise(pixels: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
        return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    return {
        "pixel_values": normalise(
            low, image_processor.image_mean, image_processor.image_std
        ),  # [1, 3, 384, 384]
        HIGH_RES_PIXELS: normalise(
            unit, image_processor.high_res_image_mean, image_processor.high_res_image_std
        ),
    }


def reference_resized_size(height: int, width: int, side: int, min_size: int) -> tuple[int, int]:
    """The image's size after the reference's resize: the longer side to ``side``, each side truncated (in the
    reference's order of operations) and at least ``min_size``."""
    longest = max(height, width)
    return max(int(height / longest * side), min_size), max(int(width / longest * side), min_size)


class DeepseekVLAdapter(HFGroundingAdapter):
    """A frozen DeepSeek-VL (plain or hybrid) read out as phrase-token attention maps and hidden states.

    The SigLIP tower's MLPs use the exact (erf) GELU of the reference's timm tower (``nn.GELU``) whatever
    the config's ``hidden_act`` says (transformers' SigLIP default is the tanh approximation): on the tiny
    model the approximation alone moves the attention maps by 2.2e-4 (maps up to 0.37), the exact GELU
    leaves 5.7e-7 (scripts/parity)."""

    model_types = ("deepseek_vl", "deepseek_vl_hybrid")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for module in self.model.modules():
            if isinstance(module, SiglipMLP):
                module.activation_fn = nn.GELU()
