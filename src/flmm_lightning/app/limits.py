"""What one web request may send, checked before the model sees it; each refusal says what to change."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from flmm_lightning.data.images import ImageLimits, UnreadableImageError, load_photo
from flmm_lightning.inference.grounder import phrase_list


class AppInputError(ValueError):
    """A request the app refuses (too large, too long, too many phrases, missing input)."""


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 4_194_304  # larger photos are downscaled to this many pixels
    max_file_mb: float = 20.0
    max_question_chars: int = 1000
    # an answer typed in "Look inside"; the answers the app itself gave in the session are always taken
    max_answer_chars: int = 4000
    max_phrases: int = 10
    # what a photo may cost to decode, measured from its header before it is decoded (refused above)
    image: ImageLimits = field(default_factory=ImageLimits)

    @classmethod
    def from_config(cls, settings: Any, image_settings: Any = None) -> Limits:
        values = {
            key: settings[key] for key in cls.__dataclass_fields__ if key in settings and key != "image"
        }
        return cls(**values, image=ImageLimits.from_config(image_settings or {}))

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)


def read_photo(path: str | Path | None, limits: Limits) -> tuple[Image.Image, str]:
    """The uploaded photo as viewers show it (EXIF orientation applied) and a notice ("" when none): above
    ``limits.max_pixels`` it is downscaled, keeping its aspect ratio. A missing, oversized, truncated or
    non-image file, or one whose header declares more than ``limits.image`` allows, raises
    (``AppInputError``, ``UnreadableImageError``)."""
    if path is None:
        raise AppInputError("upload a photo first")
    path = Path(path)
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise AppInputError(
            f"the file is {size / 2**20:.1f} MB; the limit is {limits.max_file_mb:g} MB: "
            "upload a smaller photo"
        )
    try:
        image = load_photo(path, limits.image)
    except UnreadableImageError as error:
        # The file is the session's copy of the upload: its name is the person's, its folder the server's.
        raise type(error)(str(error).replace(str(path), path.name)) from None
    width, height = image.size
    if width * height <= limits.max_pixels:
        return image, ""
    scale = math.sqrt(limits.max_pixels / (width * height))
    size_wh = (max(1, int(width * scale)), max(1, int(height * scale)))
    notice = (
        f"The photo is {width}x{height} pixels, above this app's limit of {limits.max_pixels:,} pixels: "
        f"it was downscaled to {size_wh[0]}x{size_wh[1]}."
    )
    return image.resize(size_wh, Image.Resampling.LANCZOS), notice


def checked_question(question: str | None, limits: Limits) -> str:
    question = (question or "").strip()
    if not question:
        raise AppInputError("type a question about the photo")
    if len(question) > limits.max_question_chars:
        raise AppInputError(
            f"the question has {len(question)} characters; the limit is {limits.max_question_chars}: "
            "ask a shorter one"
        )
    return question


def checked_phrases(text: str | None, limits: Limits) -> list[str]:
    """Phrases typed one per line (blank lines skipped), at most ``limits.max_phrases``."""
    phrases = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not phrases:
        raise AppInputError("type at least one phrase (one per line)")
    if len(phrases) > limits.max_phrases:
        raise AppInputError(
            f"{len(phrases)} phrases given; the limit is {limits.max_phrases} per request: remove some"
        )
    if any(len(phrase) > limits.max_question_chars for phrase in phrases):
        raise AppInputError(f"a phrase is longer than {limits.max_question_chars} characters: shorten it")
    return phrase_list(phrases)
