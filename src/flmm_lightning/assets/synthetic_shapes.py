"""The synthetic images: 2-4 non-overlapping coloured shapes on a textured, noisy background."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 210, 35),
    "purple": (135, 50, 175),
    "orange": (245, 135, 25),
}
SHAPE_KINDS = ("circle", "square", "triangle")
# A stride that spreads the shapes' panoptic ids over all three PNG channels, so decoding is exercised fully.
_SEGMENT_ID_STRIDE = 40_503


@dataclass(frozen=True)
class SyntheticShape:
    kind: str
    colour: str
    cx: float
    cy: float
    radius: float
    segment_id: int

    def draw(self, draw: ImageDraw.ImageDraw, fill: int | tuple[int, int, int]) -> None:
        r = self.radius
        x0, y0, x1, y1 = self.cx - r, self.cy - r, self.cx + r, self.cy + r
        if self.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif self.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(self.cx, y0), (x1, y1), (x0, y1)], fill=fill)


def place_shapes(rng: np.random.Generator, width: int, height: int) -> list[SyntheticShape]:
    """2-4 non-overlapping shapes, so that each mask is exactly the shape as drawn (no occlusion)."""
    count = int(rng.integers(2, 5))
    colours = rng.permutation(list(COLOURS))[:count]
    shortest = min(width, height)
    shapes: list[SyntheticShape] = []
    for colour in colours:
        for _ in range(100):
            radius = float(rng.uniform(0.08, 0.18) * shortest)
            cx = float(rng.uniform(radius + 2, width - radius - 2))
            cy = float(rng.uniform(radius + 2, height - radius - 2))
            if all(np.hypot(cx - s.cx, cy - s.cy) > 1.5 * (radius + s.radius) + 4 for s in shapes):
                kind = str(rng.choice(SHAPE_KINDS))
                segment_id = (len(shapes) + 1) * _SEGMENT_ID_STRIDE
                shapes.append(SyntheticShape(kind, str(colour), cx, cy, radius, segment_id))
                break
    return shapes


def shape_mask(shape: SyntheticShape, width: int, height: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    shape.draw(ImageDraw.Draw(canvas), 1)
    return np.asarray(canvas, dtype=np.uint8)


def render_image(
    rng: np.random.Generator, shapes: list[SyntheticShape], width: int, height: int
) -> Image.Image:
    # A desaturated base with stripes and noise: texture to ignore, never a colour a shape could have.
    base = rng.uniform(80, 180) + rng.uniform(-15, 15, size=3)
    angle, period = rng.uniform(0, np.pi), rng.uniform(12, 40)
    phase_x = 2 * np.pi * np.cos(angle) / period * np.arange(width)
    phase_y = 2 * np.pi * np.sin(angle) / period * np.arange(height)
    # sin(a + b) from 1-D factors: the same stripes as a full [H, W] sin, at a fraction of the cost.
    stripes = np.outer(np.sin(phase_y), np.cos(phase_x)) + np.outer(np.cos(phase_y), np.sin(phase_x))
    background = np.clip(base[None, None, :] + 12 * stripes[..., None], 0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        shape.draw(draw, COLOURS[shape.colour])
    noise = rng.integers(-12, 13, size=(height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
