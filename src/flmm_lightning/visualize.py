"""Mask overlays a person can look at: each object's mask in its own colour, with a legend."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (145, 30, 180),
    (245, 130, 48),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
)


def object_color(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def object_hex_color(index: int) -> str:
    """``object_color`` as CSS writes it (``#rrggbb``)."""
    return "#{:02x}{:02x}{:02x}".format(*object_color(index))


def overlay_masks(
    image: Image.Image,
    masks: torch.Tensor,
    labels: list[str],
    alpha: float = 0.5,
    color_indices: Sequence[int] | None = None,
) -> Image.Image:
    """``masks``: bool [n, H, W] at the image's size. Returns the image with tinted masks and a legend.
    ``color_indices``: each mask's palette index and legend number (default 0..n-1), so that a subset of
    objects keeps the colours and numbers it has when all are shown."""
    indices = range(max(len(masks), len(labels))) if color_indices is None else list(color_indices)
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for index, mask in zip(indices, masks.cpu().numpy().astype(bool), strict=False):
        color = np.asarray(object_color(index), dtype=np.float32)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * color
        # A solid outline keeps the mask readable where its tint blends with the object's own colour.
        canvas[mask_outline(mask)] = color
    result = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(result)
    for row, (index, label) in enumerate(zip(indices, labels, strict=False)):
        top = 4 + 14 * row
        draw.rectangle([4, top, 14, top + 10], fill=object_color(index))
        text, font = legend_entry(index, label)
        draw.text((18, top - 1), text, font=font, fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
    return result


# Fonts tried for the legend, by file name (PIL looks in the system's font folders): DejaVu Sans covers
# Latin, Greek and Cyrillic; the CJK fonts of Linux, Windows and macOS follow. PIL's bundled font (ASCII
# only) is always there. No colour-emoji font: its bitmaps come in one size only.
LEGEND_FONT_FILES = ("DejaVuSans.ttf", "NotoSansCJK-Regular.ttc", "msyh.ttc", "Arial Unicode.ttf")
LEGEND_FONT_SIZE = 10
# A private-use code point no font maps: it renders as the font's "missing glyph" box.
_MISSING = "\U000ffffd"


@functools.cache
def legend_fonts() -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, ...]:
    fonts = []
    for name in LEGEND_FONT_FILES:
        try:
            fonts.append(ImageFont.truetype(name, LEGEND_FONT_SIZE))
        except OSError:
            continue
    return (*fonts, ImageFont.load_default(LEGEND_FONT_SIZE))


def _glyph(
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont, character: str
) -> tuple[tuple[int, int], bytes]:
    mask = font.getmask(character)
    return mask.size, bytes(mask)


def draws_all(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> bool:
    """Whether ``font`` has a glyph for every character of ``text``: a missing one renders as the font's
    missing-glyph box (or as nothing, for fonts whose box is empty)."""
    missing = _glyph(font, _MISSING)
    for character in set(text):
        if character.isspace():
            continue
        glyph = _glyph(font, character)
        if glyph == missing or not any(glyph[1]):
            return False
    return True


def legend_entry(index: int, label: str) -> tuple[str, ImageFont.FreeTypeFont | ImageFont.ImageFont]:
    """The legend line of object ``index`` and the font to draw it in: ``"<index + 1> <label>"`` in the
    first font that has all of its glyphs, or the number alone where none has (no missing-glyph boxes; the
    full text stays in the JSON / per-object table, in the same order)."""
    text = f"{index + 1} {label}"
    fonts = legend_fonts()
    for font in fonts:
        if draws_all(font, text):
            return text, font
    return str(index + 1), fonts[-1]


# A heat-map's colours from cold to hot (dark blue, cyan, yellow, red), interpolated linearly between.
HEAT_COLORS = np.array([(0, 0, 128), (0, 200, 255), (255, 230, 0), (220, 20, 20)], dtype=np.float32)


def heat_colors(heat: np.ndarray) -> np.ndarray:
    """float ``[H, W]`` in [0, 1] -> float32 ``[H, W, 3]`` RGB along ``HEAT_COLORS``."""
    position = np.clip(heat, 0.0, 1.0) * (len(HEAT_COLORS) - 1)
    low = np.floor(position).astype(np.int64).clip(max=len(HEAT_COLORS) - 2)
    part = (position - low)[..., None].astype(np.float32)
    return (1 - part) * HEAT_COLORS[low] + part * HEAT_COLORS[low + 1]


def overlay_heatmap(image: Image.Image, heat: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """``image`` with ``heat`` (float ``[H, W]`` in [0, 1] at the image's size) blended over it in colour."""
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = (1 - alpha) * canvas + alpha * heat_colors(heat)
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def mask_outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its border (bool [H, W])."""
    interior = mask.copy()
    for _ in range(width):
        padded = np.pad(interior, 1, constant_values=False)
        interior = (
            padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
    return mask & ~interior


def pad_to(image: Image.Image, size: tuple[int, int], fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """``image`` at the top left of a ``size`` (width, height) canvas of ``fill``."""
    if image.size == tuple(size):
        return image
    canvas = Image.new("RGB", size, fill)
    canvas.paste(image, (0, 0))
    return canvas


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 8) -> Image.Image:
    combined = Image.new(
        "RGB", (left.width + gap + right.width, max(left.height, right.height)), (255, 255, 255)
    )
    combined.paste(left, (0, 0))
    combined.paste(right, (left.width + gap, 0))
    return combined


def label_map(masks: torch.Tensor) -> np.ndarray:
    """[n, H, W] bool -> [H, W] int with object k as k + 1 and 0 as background (later objects on top)."""
    labels = np.zeros(masks.shape[-2:], dtype=np.int32)
    for index, mask in enumerate(masks.cpu().numpy().astype(bool)):
        labels[mask] = index + 1
    return labels
