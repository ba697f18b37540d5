"""What one web request may send, checked before the model sees it; each refusal says what to change."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from flmm_lightning.data.images import load_photo
from flmm_lightning.predict import phrase_list


class AppInputError(ValueError):
    """A request the app refuses (too large, too long, too many phrases, missing input)."""


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 4_194_304  # larger photos are downscaled to this many pixels
    max_file_mb: float = 20.0
    max_question_chars: int = 1000
    max_phrases: int = 10

    @classmethod
    def from_config(cls, settings: Any) -> Limits:
        return cls(**{key: settings[key] for key in cls.__dataclass_fields__ if key in settings})

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1024 * 1024)


def read_photo(path: str | Path | None, limits: Limits) -> tuple[Image.Image, str]:
    """The uploaded photo as viewers show it (EXIF orientation applied) and a notice ("" when none): above
    ``limits.max_pixels`` it is downscaled, keeping its aspect ratio. A missing, oversized, truncated or
    non-image file raises (``AppInputError``, ``UnreadableImageError``)."""
    if path is None:
        raise AppInputError("upload a photo first")
    path = Path(path)
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise AppInputError(
            f"the file is {size / 2**20:.1f} MB; the limit is {limits.max_file_mb:g} MB: "
            "upload a smaller photo"
        )
    image = load_photo(path)
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
