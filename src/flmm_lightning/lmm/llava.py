"""LLaVA-1.5 (``LlavaForConditionalGeneration``): the image padded to a square, one fixed grid.

The reference shows the vision tower (336 px for LLaVA-1.5) the whole image, centred on a square in the mean
colour, instead of the processor's default centre crop. ``do_pad=True`` makes the processor do that (it pads,
then resizes; the reference resizes, then pads: the same square up to interpolation at the image's border),
with ``(side - size) // 2`` padding before the image. The coarse mask then covers the square, and
``content_box`` tells the shared head where the real image lies inside it. Image tokens are the
row-major cells of the ``crop_size / patch_size`` grid (24x24 for LLaVA-1.5), CLS dropped by the released
``vision_feature_select_strategy="default"``.
"""

from __future__ import annotations

from flmm_lightning.boundaries import GroundingSample
from flmm_lightning.lmm.hf import HFGroundingAdapter
from flmm_lightning.lmm.prompting import ChatPromptBuilder, EncodedImage


class LlavaPromptBuilder(ChatPromptBuilder):
    """Chat prompt (``USER: <image>\\n<instruction> ASSISTANT:`` for LLaVA-1.5), then the utterances."""

    processor_classes = ("LlavaProcessor",)

    def _encode_image(self, sample: GroundingSample, prompt: str) -> EncodedImage:
        processor = self.processor
        encoded = processor(images=[sample.image], text=[prompt], do_pad=True, return_tensors="pt")
        crop = processor.image_processor.crop_size
        height, width = sample.image.height, sample.image.width
        side = max(height, width)
        return EncodedImage(
            prompt_ids=encoded["input_ids"][0],
            pixel_inputs={"pixel_values": encoded["pixel_values"]},  # [1, 3, crop_h, crop_w]
            grid_hw=(crop.height // processor.patch_size, crop.width // processor.patch_size),
            padded_hw=(side, side),
            content_box=((side - height) // 2, (side - width) // 2, height, width),
        )


class LlavaAdapter(HFGroundingAdapter):
    """A frozen LLaVA-1.5 read out as phrase-token attention maps and projected hidden states."""

    model_types = ("llava",)
