"""Gemma 3 (``Gemma3ForConditionalGeneration``): one squashed square image, one fixed grid, mixed layers.

Image: the processor squashes the image to the SigLIP tower's square (896 px in the release; pan-and-scan
crops are switched off here, so every image is one square), and the projector average-pools the 64x64 patch
grid to ``mm_tokens_per_image`` tokens (16x16 = 256), row-major. The placeholder ``<start_of_image>`` becomes
``"\\n\\n" <start_of_image> 256 x <image_soft_token> <end_of_image> "\\n\\n"``; only the soft tokens are image
columns. The grid covers the whole image (stretched, no padding), so the coarse mask needs no crop.

Attention read-out: every decoder layer, as for the other families (L·H channels). Gemma 3 interleaves five
local layers (sliding window: 1024 tokens in the 4B/12B releases) with one global layer, and lets image tokens
attend to each other in both directions. What the read-out takes, and why that is exact:

- the rows read are phrase (text) tokens, which attend causally; the bidirectional block only changes the
  image tokens' own rows, so it enters the maps only through the image tokens' keys, as in the model;
- both captures use the mask the model builds for each layer (sliding or global), so a local layer's row
  holds the probabilities the model used: a phrase token further than the window from an image token gives
  that token zero probability in local layers. With 256 image tokens and the instruction, every phrase
  token within about 750 tokens of the prompt's end sees the whole image in every layer; beyond that the
  local layers' maps lose the image's first rows (the U-Net's per-map normalisation keeps them finite);
- attention-logit soft-capping (Gemma 2; ``attn_logit_softcapping``, None in every Gemma 3 release) is not in
  the fused capture's probabilities, so a checkpoint that sets it is refused rather than read approximately.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flmm_lightning.boundaries import GroundingSample, LMMBatch
from flmm_lightning.lmm.hf import HFGroundingAdapter
from flmm_lightning.lmm.prompting import ChatPromptBuilder, EncodedImage


class Gemma3PromptBuilder(ChatPromptBuilder):
    """Chat prompt (Gemma's turns, BOS from the template), then the utterances."""

    processor_classes = ("Gemma3Processor",)

    def _configure(self, processor: Any) -> None:
        side = math.isqrt(processor.image_seq_length)
        if side * side != processor.image_seq_length:
            raise ValueError(
                f"{self.pretrained}: {processor.image_seq_length} image tokens do not make a square grid"
            )
        # The chat template writes BOS itself; a tokenizer adding one too would start every prompt with two.
        processor.tokenizer.add_bos_token = False
        self._image_sequence_tokens: int | None = None

    def _image_tokens(self, sample: GroundingSample) -> int:
        # The placeholder becomes the full image sequence, whose newlines the tokenizer may merge with the
        # text around them: counted once on the prompt itself, the same wherever the template puts the image.
        if getattr(self, "_image_sequence_tokens", None) is None:
            processor = self.processor
            tokenizer = processor.tokenizer
            prompt = self._prompt
            expanded = prompt.replace(processor.boi_token, processor.full_image_sequence, 1)
            count = len(tokenizer(expanded)["input_ids"]) - len(tokenizer(prompt)["input_ids"]) + 1
            self._image_sequence_tokens = count
        return self._image_sequence_tokens

    def _encode_image(self, sample: GroundingSample, prompt: str) -> EncodedImage:
        processor = self.processor
        encoded = processor(images=[sample.image], text=[prompt], do_pan_and_scan=False, return_tensors="pt")
        side = math.isqrt(processor.image_seq_length)
        size = processor.image_processor.size
        padded_hw = (size["height"], size["width"])
        return EncodedImage(
            prompt_ids=encoded["input_ids"][0],
            pixel_inputs={"pixel_values": encoded["pixel_values"]},  # [1, 3, side_px, side_px]
            grid_hw=(side, side),
            padded_hw=padded_hw,
            content_box=(0, 0, *padded_hw),
        )


class Gemma3Adapter(HFGroundingAdapter):
    """A frozen Gemma 3 read out as phrase-token attention maps (every local and global layer) and projected
    hidden states."""

    model_types = ("gemma3",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        softcap = self.model.config.text_config.attn_logit_softcapping
        if softcap is not None:
            raise ValueError(
                f"attn_logit_softcapping={softcap}: the fused capture computes plain softmax probabilities, "
                "so soft-capped attention cannot be read exactly; use a checkpoint without it"
            )

    def _pixel_inputs(
        self, batch: LMMBatch, image_tokens: torch.Tensor, device: torch.device
    ) -> dict[str, torch.Tensor]:
        return {
            **super()._pixel_inputs(batch, image_tokens, device),  # pixel_values
            # Text 0 / image 1, as the processor returns it: the model lets image tokens attend to each other
            # in both directions from it.
            "token_type_ids": image_tokens.long(),
        }
