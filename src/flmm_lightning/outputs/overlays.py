"""Mask overlays a person can look at: each object's mask in its own colour, with a legend."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

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
    for entry in legend_layout(list(zip(indices, labels, strict=False)), result.size):
        draw.rectangle(entry.swatch, fill=object_color(entry.index))
        draw.text(
            entry.text_xy,
            entry.text,
            font=entry.font,
            fill=(255, 255, 255),
            stroke_width=LEGEND_STROKE,
            stroke_fill=(0, 0, 0),
        )
    return result


LEGEND_FONT_SIZES = (10, 9, 8, 7, 6)  # tried in turn until the legend fits
LEGEND_MARGIN = 4  # pixels between the legend and the image's edges
LEGEND_COLUMN_GAP = 8
LEGEND_STROKE = 1
# The legend stays out of the image's top band: Gradio draws the image component's label ("Masks") over its
# top left and its buttons over its top right.
LEGEND_FREE_TOP = 0.15


@dataclass(frozen=True)
class LegendEntry:
    index: int  # the object's palette index (its number is index + 1)
    text: str
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont
    swatch: tuple[int, int, int, int]  # x0, y0, x1, y1 of the colour square
    text_xy: tuple[int, int]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The pixels the entry covers (swatch and text, outline included)."""
        left, top, right, bottom = self.font.getbbox(self.text, stroke_width=LEGEND_STROKE)
        x, y = self.text_xy
        return self.swatch[0], min(self.swatch[1], y + top), x + right, max(self.swatch[3], y + bottom)


def _text_width(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> int:
    return math.ceil(font.getbbox(text, stroke_width=LEGEND_STROKE)[2])


def _shortened(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str, width: int) -> str:
    """``text`` cut (with "…") to fit ``width`` pixels; its leading number is always kept."""
    if _text_width(font, text) <= width:
        return text
    number, _, rest = text.partition(" ")
    for end in range(len(rest), -1, -1):
        candidate = f"{number} {rest[:end]}…" if end else number
        if _text_width(font, candidate) <= width:
            return candidate
    return number


def legend_layout(objects: Sequence[tuple[int, str]], size: tuple[int, int]) -> list[LegendEntry]:
    """Where each ``(palette index, label)`` of the legend goes on an image of ``size`` (width, height): in
    columns from the bottom left, below the top band (``LEGEND_FREE_TOP``), at the largest font size at which
    every column fits across the image; where none does, at the smallest, with labels shortened ("…") to
    equal column widths. Every entry keeps its number."""
    if not objects:
        return []
    width, height = size
    top = max(LEGEND_MARGIN, math.ceil(height * LEGEND_FREE_TOP))
    available = (max(1, height - LEGEND_MARGIN - top), max(1, width - 2 * LEGEND_MARGIN))
    for font_size in LEGEND_FONT_SIZES:
        line = font_size + 4
        rows = max(1, available[0] // line)
        entries = [(index, *legend_entry(index, label, font_size)) for index, label in objects]
        columns = [entries[start : start + rows] for start in range(0, len(entries), rows)]
        widths = [line + max(_text_width(font, text) for _, text, font in column) for column in columns]
        if (
            sum(widths) + LEGEND_COLUMN_GAP * (len(columns) - 1) <= available[1]
            or font_size == LEGEND_FONT_SIZES[-1]
        ):
            break
    fits = sum(widths) + LEGEND_COLUMN_GAP * (len(columns) - 1) <= available[1]
    if not fits:
        share = (available[1] - LEGEND_COLUMN_GAP * (len(columns) - 1)) // len(columns)
        widths = [share] * len(columns)
    first_row = height - LEGEND_MARGIN - line * min(rows, len(entries))
    layout = []
    left = LEGEND_MARGIN
    for column, column_width in zip(columns, widths, strict=True):
        for row, (index, text, font) in enumerate(column):
            y = first_row + row * line
            if not fits:
                text = _shortened(font, text, column_width - line)
            swatch = (left, y + 2, left + line - 5, y + line - 3)
            layout.append(LegendEntry(index, text, font, swatch, (left + line - 1, y)))
        left += column_width + LEGEND_COLUMN_GAP
    return layout


# Fonts tried for the legend, by file name (PIL looks in the system's font folders): DejaVu Sans covers
# Latin, Greek and Cyrillic; the CJK fonts of Linux, Windows and macOS follow. PIL's bundled font (ASCII
# only) is always there. No colour-emoji font: its bitmaps come in one size only.
LEGEND_FONT_FILES = ("DejaVuSans.ttf", "NotoSansCJK-Regular.ttc", "msyh.ttc", "Arial Unicode.ttf")
LEGEND_FONT_SIZE = 10
# A private-use code point no font maps: it renders as the font's "missing glyph" box.
_MISSING = "\U000ffffd"


@functools.cache
def legend_fonts(size: int = LEGEND_FONT_SIZE) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, ...]:
    fonts = []
    for name in LEGEND_FONT_FILES:
        try:
            fonts.append(ImageFont.truetype(name, size))
        except OSError:
            continue
    return (*fonts, ImageFont.load_default(size))


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


def legend_entry(
    index: int, label: str, size: int = LEGEND_FONT_SIZE
) -> tuple[str, ImageFont.FreeTypeFont | ImageFont.ImageFont]:
    """The legend line of object ``index`` and the font to draw it in: ``"<index + 1> <label>"`` in the
    first font that has all of its glyphs, or the number alone where none has (no missing-glyph boxes; the
    full text stays in the JSON / per-object table, in the same order)."""
    text = f"{index + 1} {label}"
    fonts = legend_fonts(size)
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
