"""InternVL3 / InternVL3.5 (``InternVLForConditionalGeneration``): dynamic tiles plus a thumbnail, one grid.

The image processor (``GotOcr2ImageProcessor``, ``crop_to_patches``) picks the arrangement of
``rows x columns`` tiles (between ``min_patches`` and ``max_patches``: 1 and 12 in the release) whose aspect
ratio is closest to the image's, stretches the image onto it, cuts it into tower-sized tiles (448 px) and,
when there is more than one tile, appends the whole image squashed to one tile (the thumbnail). The tower's
patch grid (32x32) is pixel-shuffled 2x2, so every tile becomes ``t x t`` row-major tokens (16x16 = 256).
Image tokens are ``<img>``, the tiles in row-major order, the thumbnail, ``</img>``; only the
``<IMG_CONTEXT>`` tokens between the two markers are image columns.

Read-out (the LLaVA-NeXT choice, as the reference handles a base image plus crops): the tiles are put back
together into one ``rows*t x columns*t`` grid over the whole (stretched) image; the thumbnail's ``t x t`` maps
are resized bilinearly onto that grid and stacked before it on the channel axis (2·L·H channels). An image
that takes a single tile has no thumbnail: that tile *is* the whole image at tower size, so its maps fill
both halves. The grid covers the image with no padding, so the coarse mask needs no crop.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from flmm_lightning.boundaries import GroundingSample
from flmm_lightning.lmm.compat import optimal_tiled_canvas
from flmm_lightning.lmm.hf import HFGroundingAdapter
from flmm_lightning.lmm.prompting import ChatPromptBuilder, EncodedImage


class InternVLPromptBuilder(ChatPromptBuilder):
    """Chat prompt (the checkpoint's Qwen-style template, the image as ``<IMG_CONTEXT>``), then the
    utterances."""

    processor_classes = ("InternVLProcessor",)
    fewer_image_tokens_hint = (
        "lower the tile limit (model.prompt.max_tiles) or raise model.prompt.max_length if the LMM was "
        "trained on longer sequences"
    )

    def __init__(self, *args: Any, max_tiles: int | None = None, **kwargs: Any) -> None:
        """``max_tiles``: the most tiles an image is cut into (the processor's ``max_patches``; None keeps the
        checkpoint's, 12 in the release); fewer tiles, fewer image tokens."""
        super().__init__(*args, **kwargs)
        self.max_tiles = max_tiles

    def _configure(self, processor: Any) -> None:
        # InternVLProcessor always asks its image processor for tiles (``crop_to_patches=True`` by default,
        # whatever the image processor's own setting); the tile limits are the image processor's.
        image_processor = processor.image_processor
        if self.max_tiles is not None:
            if self.max_tiles < image_processor.min_patches:
                raise ValueError(
                    f"model.prompt.max_tiles={self.max_tiles} is below the processor's "
                    f"min_patches={image_processor.min_patches}"
                )
            image_processor.max_patches = self.max_tiles

    def tile_grid(self, height: int, width: int) -> tuple[int, int]:
        """The (rows, columns) of tiles a ``height`` x ``width`` image is cut into."""
        return optimal_tiled_canvas(self.processor.image_processor, height, width)

    def _encode_image(self, sample: GroundingSample, prompt: str) -> EncodedImage:
        processor = self.processor
        encoded = processor(images=[sample.image], text=[prompt], return_tensors="pt")
        rows, columns = self.tile_grid(sample.image.height, sample.image.width)
        cells = tile_side(processor.image_seq_length)
        tile = processor.image_processor.size
        padded_hw = (rows * tile["height"], columns * tile["width"])  # the stretched image the tiles cover
        return EncodedImage(
            prompt_ids=encoded["input_ids"][0],
            # [tiles (+1 thumbnail), 3, side, side]: images are concatenated on the first axis, as the model
            # takes them (one image per sample, so each sample's tiles stay together).
            pixel_inputs={"pixel_values": encoded["pixel_values"]},
            grid_hw=(rows * cells, columns * cells),
            padded_hw=padded_hw,
            content_box=(0, 0, *padded_hw),
        )


def tile_side(tokens_per_tile: int) -> int:
    """The side of a tile's square token grid."""
    side = math.isqrt(tokens_per_tile)
    if side * side != tokens_per_tile:
        raise ValueError(f"{tokens_per_tile} tokens per tile do not make a square grid")
    return side


class InternVLAdapter(HFGroundingAdapter):
    """A frozen InternVL3 / 3.5 read out as thumbnail- and tile-grid attention maps and projected hidden
    states."""

    model_types = ("internvl",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        config = self.model.config
        self.tile_cells: int = tile_side(config.image_seq_length)  # t: a tile's grid side in tokens

    @property
    def attention_channels(self) -> int:
        return 2 * self.num_layers * self.num_heads

    def image_maps(self, maps: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """``[n, L, H, N]`` over the tiles' (then the thumbnail's) tokens -> ``[n, 2*L*H, h, w]`` on the tile
        grid, thumbnail first."""
        n, t = maps.shape[0], self.tile_cells
        h, w = grid_hw
        rows, columns = h // t, w // t
        tiles = rows * columns
        expected = tiles * t * t + (t * t if tiles > 1 else 0)
        if rows * t != h or columns * t != w or expected != maps.shape[-1]:
            raise ValueError(
                f"{maps.shape[-1]} image tokens for a {h}x{w} grid of {t}x{t}-token tiles (plus a thumbnail "
                "when there is more than one tile)"
            )
        maps = maps.reshape(n, -1, maps.shape[-1])  # [n, L*H, N], layer-major
        channels = maps.shape[1]
        # [n, C, rows, columns, t, t] -> [n, C, rows, t, columns, t] -> [n, C, h, w]
        tiled = maps[..., : tiles * t * t].reshape(n, channels, rows, columns, t, t)
        tiled = tiled.permute(0, 1, 2, 4, 3, 5).reshape(n, channels, h, w)
        if tiles == 1:
            return torch.cat([tiled, tiled], dim=1)  # [n, 2*L*H, t, t]: the one tile is the thumbnail
        thumbnail = maps[..., tiles * t * t :].reshape(n, channels, t, t)  # [n, L*H, t, t]
        thumbnail = F.interpolate(thumbnail, size=(h, w), mode="bilinear")  # [n, L*H, h, w]
        return torch.cat([thumbnail, tiled], dim=1)  # [n, 2*L*H, h, w]
