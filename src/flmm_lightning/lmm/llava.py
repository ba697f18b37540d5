"""LLaVA-1.5 (``LlavaForConditionalGeneration``): the image padded to a square, one fixed grid.

The reference shows the vision tower (336 px for LLaVA-1.5) the whole image, centred on a square in the mean
colour, instead of the processor's default centre crop: its processor resizes the image so that the longer
side is the processor's ``shortest_edge`` (the other side truncated, bicubic), then pads it to a square with
``int(255 * mean)`` per channel and ``pad // 2`` before the image. ``square_like_reference`` does exactly
that, and the processor only rescales and normalises (measured against the reference: scripts/parity). The
coarse mask then covers the square, and ``content_box`` (in the square's pixels) tells the shared head where
the real image lies inside it. Image tokens are the row-major cells of the ``side / patch_size`` grid (24x24
for LLaVA-1.5), CLS dropped by the released ``vision_feature_select_strategy="default"``.
"""

from __future__ import annotations

from PIL import Image

from flmm_lightning.boundaries import GroundingSample
from flmm_lightning.lmm.hf import HFGroundingAdapter
from flmm_lightning.lmm.prompting import ChatPromptBuilder, EncodedImage


def square_like_reference(
    image: Image.Image, side: int, mean: tuple[float, float, float]
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """``image`` resized (bicubic) so that its longer side is ``side``, centred on a square of that side in
    the colour ``int(255 * mean)``; and the ``(top, left, height, width)`` of the image inside the square."""
    width, height = image.size
    if height > width:
        new_height, new_width = side, int(width * side / height)
    else:
        new_height, new_width = int(height * side / width), side
    resized = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    top, left = (side - new_height) // 2, (side - new_width) // 2
    square = Image.new("RGB", (side, side), tuple(int(channel * 255) for channel in mean))
    square.paste(resized, (left, top))
    return square, (top, left, new_height, new_width)


class LlavaPromptBuilder(ChatPromptBuilder):
    """Chat prompt (``USER: <image>\\n<instruction> ASSISTANT:`` for LLaVA-1.5), then the utterances."""

    processor_classes = ("LlavaProcessor",)

    def _encode_image(self, sample: GroundingSample, prompt: str) -> EncodedImage:
        processor = self.processor
        image_processor = processor.image_processor
        side = image_processor.size["shortest_edge"]
        square, content_box = square_like_reference(sample.image, side, tuple(image_processor.image_mean))
        encoded = processor(
            images=[square],
            text=[prompt],
            do_resize=False,
            do_center_crop=False,
            do_pad=False,
            return_tensors="pt",
        )
        return EncodedImage(
            prompt_ids=encoded["input_ids"][0],
            pixel_inputs={"pixel_values": encoded["pixel_values"]},  # [1, 3, side, side]
            grid_hw=(side // processor.patch_size, side // processor.patch_size),
            padded_hw=(side, side),
            content_box=content_box,
        )


class LlavaAdapter(HFGroundingAdapter):
    """A frozen LLaVA-1.5 read out as phrase-token attention maps and projected hidden states."""

    model_types = ("llava",)
