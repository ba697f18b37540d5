"""Small in-memory samples shared by the LMM tests (random-noise images of given sizes)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from flmm_lightning.boundaries import NOT_GROUNDED, GroundingSample


def make_sample(
    height: int,
    width: int,
    phrases: list[str],
    image_id: int,
    utterances: list[tuple[str, int]] | None = None,
) -> GroundingSample:
    rng = np.random.default_rng(image_id)
    return GroundingSample.for_inference(
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)),
        phrases,
        image_id=image_id,
        file_name=f"img_{image_id}.jpg",
        utterances=utterances,
    )


def png_like(height: int, width: int) -> GroundingSample:
    """A narrative whose ungrounded utterances sit between the grounded ones."""
    return make_sample(
        height,
        width,
        ["Two people", "a frisbee"],
        1,
        utterances=[
            ("In this picture we can see", NOT_GROUNDED),
            ("Two people", 0),
            ("playing with", NOT_GROUNDED),
            ("a frisbee", 1),
        ],
    )
