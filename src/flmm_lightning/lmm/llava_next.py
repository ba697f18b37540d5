"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): any-res, two grids per image, 2·L·H channels.

The processor encodes an image twice: the whole image squashed to the tower's size (the base grid, 24x24
for 336 px) and the image at the best of ``image_grid_pinpoints`` cut into tower-sized crops (the any-res
grid). The model removes the any-res grid's padding (``unpad_image``) and ends each of its rows with a newline
token. Image tokens are therefore ``base_h*base_w`` row-major base cells, then ``h`` rows of ``w`` any-res
cells and one newline. As in the reference, the newline column is dropped, the base maps are resized
bilinearly to the any-res grid ``(h, w)``, and the two are stacked on the channel axis (base first). The
any-res grid covers the image without padding, so the coarse mask needs no crop.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from flmm_lightning.boundaries import GroundingSample
from flmm_lightning.lmm.compat import select_best_resolution, unpadded_features
from flmm_lightning.lmm.hf import HFGroundingAdapter
from flmm_lightning.lmm.prompting import ChatPromptBuilder, EncodedImage


class LlavaNextPromptBuilder(ChatPromptBuilder):
    """Chat prompt (the checkpoint's own template: Vicuna or Mistral), then the utterances."""

    processor_classes = ("LlavaNextProcessor",)

    def crop_geometry(self) -> tuple[int, int]:
        """(side, patch): every crop, the base image included, is ``side`` x ``side`` pixels, one image token
        per ``patch`` x ``patch`` pixels of it."""
        processor = self.processor
        return processor.image_processor.crop_size.height, processor.patch_size

    def anyres_grid(self, height: int, width: int) -> tuple[int, int]:
        """The any-res grid (rows, columns; newline column excluded) of a ``height`` x ``width`` image."""
        processor = self.processor
        side, patch = self.crop_geometry()
        best_h, best_w = select_best_resolution(
            [height, width], processor.image_processor.image_grid_pinpoints
        )
        cells, rows = unpadded_features(
            processor, height, width, side // patch, best_h // side, best_w // side
        )
        return rows, cells // rows

    def _encode_image(self, sample: GroundingSample, prompt: str) -> EncodedImage:
        processor = self.processor
        encoded = processor(images=[sample.image], text=[prompt], return_tensors="pt")
        rows, columns = self.anyres_grid(sample.image.height, sample.image.width)
        # The any-res cells in crop pixels: what the grid covers once the model has removed the padding.
        patch = self.crop_geometry()[1]
        padded_hw = (rows * patch, columns * patch)
        return EncodedImage(
            prompt_ids=encoded["input_ids"][0],
            pixel_inputs={
                "pixel_values": encoded["pixel_values"],  # [1, crops, 3, side, side], base image first
                "image_sizes": encoded["image_sizes"],  # [1, 2]: (height, width)
            },
            grid_hw=(rows, columns),
            padded_hw=padded_hw,
            content_box=(0, 0, *padded_hw),
        )

    def _collate_pixels(self, pixel_inputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        # Images have different crop counts; the model reads each image's count back from image_sizes and
        # ignores the zero crops padded on here.
        most = max(p["pixel_values"].shape[1] for p in pixel_inputs)
        pixel_values = [
            F.pad(p["pixel_values"], (0, 0, 0, 0, 0, 0, 0, most - p["pixel_values"].shape[1]))
            for p in pixel_inputs
        ]
        return {
            "pixel_values": torch.cat(pixel_values, dim=0),  # [B, most, 3, side, side]
            "image_sizes": torch.cat([p["image_sizes"] for p in pixel_inputs], dim=0),  # [B, 2]
        }


class LlavaNextAdapter(HFGroundingAdapter):
    """A frozen LLaVA-NeXT read out as base- and any-res-grid attention maps and projected hidden states."""

    model_types = ("llava_next",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        self.base_grid_hw = (side, side)

    @property
    def attention_channels(self) -> int:
        return 2 * self.num_layers * self.num_heads

    def image_maps(self, maps: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """``[n, L, H, N]`` over base + any-res image tokens -> ``[n, 2*L*H, h, w]`` on the any-res grid."""
        n = maps.shape[0]
        (base_h, base_w), (h, w) = self.base_grid_hw, grid_hw
        base_tokens = base_h * base_w
        if base_tokens + h * (w + 1) != maps.shape[-1]:
            raise ValueError(
                f"{maps.shape[-1]} image tokens for a {base_h}x{base_w} base grid and a {h}x{w} any-res grid "
                "with its newline column"
            )
        maps = maps.reshape(n, -1, maps.shape[-1])  # [n, L*H, N], layer-major
        base = maps[..., :base_tokens].reshape(n, -1, base_h, base_w)  # [n, L*H, base_h, base_w]
        anyres = maps[..., base_tokens:].reshape(n, -1, h, w + 1)[..., :w]  # [n, L*H, h, w]
        base = F.interpolate(base, size=(h, w), mode="bilinear")  # [n, L*H, h, w]
        return torch.cat([base, anyres], dim=1)  # [n, 2*L*H, h, w]
