"""Image loading that fails loudly: every pixel is decoded here, so a broken file is caught in the dataset.

Every image is measured before it is decoded (``open_image_checked``): PIL reads only the header (size,
mode, frames), and an image above the pixel or memory budget (``ImageLimits``) is refused with a message
naming the file, its size and the limit. A few hundred kilobytes of compressed zeros can declare gigabytes
of pixels; decoding first and checking after is how such a file exhausts memory.

PIL opens files lazily; a truncated JPEG only fails when its pixels are read, which would otherwise happen
deep inside a processor. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left off on purpose: a half-grey image with
a full-size mask is a wrong training sample, not a usable one.

EXIF orientation is NOT applied to dataset images: COCO annotations (RefCOCO, panoptic) are drawn on the
stored pixel grid. A person's photo (``load_photo``, ``as_displayed``: predict and ``Grounder``) is oriented
as image viewers show it, so that its masks line up with what the person sees.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from segment_anything.utils.transforms import ResizeLongestSide

from flmm_lightning.data.bad_samples import BadSampleError, BadSampleReason

# Errors PIL raises for files it cannot identify or decode (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class UnreadableImageError(ValueError):
    """A photo handed to predict / ``Grounder`` that cannot be read (names the file)."""


# 16-bit grey levels span the whole unsigned range; PIL's own conversion clips them at 255 (white).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# 32-bit integer and float images have no nominal range: their own minimum and maximum are black and white.
_UNBOUNDED_MODES = ("I", "F")


class ImageTooLargeError(UnreadableImageError):
    """An image whose header declares more pixels or decoded bytes than ``ImageLimits`` allow."""


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost once decoded. ``max_pixels``: width x height of its first frame (the
    default takes a 48-megapixel phone photo). ``max_memory_mb``: the bytes ``decode_bytes`` estimates for
    decoding it and converting it to 8-bit RGB (16/32-bit images need float working arrays, so they reach
    this budget at fewer pixels). ``setting``: the config group named in refusals."""

    max_pixels: int = 50_000_000
    max_memory_mb: float = 1024.0
    setting: str = "image_limits"

    @classmethod
    def from_config(cls, settings: Any, setting: str = "image_limits") -> ImageLimits:
        """From a config mapping (absent keys keep their defaults); non-positive limits are refused."""
        keys = ("max_pixels", "max_memory_mb")
        values = {key: settings[key] for key in keys if settings.get(key) is not None}
        limits = cls(**values, setting=setting)
        if not (limits.max_pixels > 0 and limits.max_memory_mb > 0):
            raise ValueError(f"{setting}: max_pixels and max_memory_mb must be positive, got {values}")
        return limits


# Bytes per pixel of a decoded frame in PIL's memory: 1-byte modes, 16-bit grey, and 4 bytes for the rest
# (PIL stores every multi-band and 32-bit mode in 4 bytes).
_ONE_BYTE_MODES = ("1", "L", "P")


@dataclass(frozen=True)
class ImageHeader:
    """What an image file declares, read without decoding its pixels."""

    width: int
    height: int
    mode: str
    frames: int
    format: str | None

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decode_bytes(self) -> int:
        """Estimated peak bytes of decoding the first frame and making it 8-bit RGB: the decoded frame, its
        RGB copy (4 bytes a pixel in PIL), and for 16/32-bit modes the three float64 arrays of
        ``to_rgb``'s rescaling."""
        frame = 1 if self.mode in _ONE_BYTE_MODES else 2 if self.mode in _SIXTEEN_BIT_MODES else 4
        rescale = 3 * 8 if self.mode in _SIXTEEN_BIT_MODES + _UNBOUNDED_MODES else 0
        return self.pixels * (frame + 4 + rescale)


def measure_image(image: Image.Image) -> ImageHeader:
    """The header of a lazily opened image (``Image.open``): nothing is decoded."""
    return ImageHeader(image.width, image.height, image.mode, getattr(image, "n_frames", 1), image.format)


def check_image(header: ImageHeader, limits: ImageLimits, name: str | Path) -> None:
    """Raises ``ImageTooLargeError`` naming the file, its size and the limit it is over."""
    described = f"{name} is {header.width}x{header.height} pixels ({header.pixels:,}, mode {header.mode})"
    if header.pixels > limits.max_pixels:
        raise ImageTooLargeError(
            f"image too large: {described}, above the limit of {limits.max_pixels:,} pixels "
            f"({limits.setting}.max_pixels); downscale it or raise the limit"
        )
    needed_mb = header.decode_bytes / 2**20
    if needed_mb > limits.max_memory_mb:
        raise ImageTooLargeError(
            f"image too large: {described}; decoding it needs about {math.ceil(needed_mb):,} MB, above the "
            f"budget of {limits.max_memory_mb:,g} MB ({limits.setting}.max_memory_mb); convert it to 8-bit "
            "or downscale it, or raise the budget"
        )


def open_image_checked(path: str | Path, limits: ImageLimits | None = None) -> Image.Image:
    """Measures ``path``'s header against ``limits`` (default ``ImageLimits()``), then decodes its first
    frame: a fully loaded PIL image in the file's own mode, EXIF orientation NOT applied (``as_displayed``
    does that). Raises ``UnreadableImageError`` naming the file when it is missing, not an image, truncated
    or undecodable, and ``ImageTooLargeError`` (a subclass) when it is over a limit."""
    path = Path(path)
    if path.is_dir():
        raise UnreadableImageError(f"{path} is a folder: give one image file in it (image=<file>)")
    if not path.is_file():
        raise UnreadableImageError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            # PIL warns of a "decompression bomb" from the header alone; the budget below is the real check.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            check_image(measure_image(image), limits or ImageLimits(), path)
            image.load()
            # The copy outlives the file handle (multi-frame formats such as MPO keep theirs open).
            return image.copy()
    except _DECODE_ERRORS as error:
        if isinstance(error, UnreadableImageError):
            raise
        raise UnreadableImageError(f"cannot read image {path}: {type(error).__name__}: {error}") from error


def open_image(
    path: str | Path, *, dataset: str, sample_id: str, limits: ImageLimits | None = None
) -> Image.Image:
    """``open_image_checked`` for a dataset: raises ``BadSampleError`` when the file is missing, unreadable
    or over ``limits``."""
    path = Path(path)
    if not path.is_file():
        raise BadSampleError(dataset, sample_id, str(path), BadSampleReason.MISSING_FILE, "file not found")
    try:
        return open_image_checked(path, limits)
    except UnreadableImageError as error:
        reason = BadSampleReason.UNREADABLE_IMAGE
        raise BadSampleError(dataset, sample_id, str(path), reason, str(error)) from error


def _high_bit_depth_to_grey(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if image.mode in _SIXTEEN_BIT_MODES:
        low, high = 0.0, 65535.0
    else:
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. Alpha is dropped (the colour under it is kept), as a plain ``convert``
    does; 16-bit grey is scaled from 0..65535, 32-bit integer and float grey from their own value range."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES + _UNBOUNDED_MODES:
        image = _high_bit_depth_to_grey(image)
    elif image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
        # PIL warns when a palette with transparency goes straight to RGB; via RGBA is the route it asks for.
        image = image.convert("RGBA")
    elif image.mode == "La":  # premultiplied alpha: PIL converts it only to LA
        image = image.convert("LA")
    return image.convert("RGB")


def as_displayed(image: Image.Image) -> Image.Image:
    """``image`` as viewers show it: its EXIF orientation applied, in 8-bit RGB."""
    return to_rgb(ImageOps.exif_transpose(image))


def load_photo(path: str | Path, limits: ImageLimits | None = None) -> Image.Image:
    """Reads a person's photo fully (``open_image_checked``: measured against ``limits`` first), oriented as
    viewers show it (``as_displayed``); a missing, truncated, undecodable or oversized file raises
    ``UnreadableImageError`` naming it."""
    image = open_image_checked(path, limits)
    try:
        return as_displayed(image)
    except _DECODE_ERRORS as error:
        raise UnreadableImageError(f"cannot read image {path}: {type(error).__name__}: {error}") from error


def check_size(
    image: Image.Image, expected_wh: tuple[int, int], *, path: str | Path, dataset: str, sample_id: str
) -> None:
    """The annotation's masks are only valid on an image of the size they were drawn for."""
    if image.size != tuple(expected_wh):
        (width, height), (expected_width, expected_height) = image.size, expected_wh
        detail = f"image is {width}x{height} (WxH), the annotation says {expected_width}x{expected_height}"
        raise BadSampleError(dataset, sample_id, str(path), BadSampleReason.SIZE_MISMATCH, detail)


def load_rgb_image(
    path: str | Path, *, dataset: str, sample_id: str, expected_wh: tuple[int, int] | None = None
) -> Image.Image:
    """Loads ``path`` as a fully decoded RGB image, checking its size (width, height) when given."""
    image = to_rgb(open_image(path, dataset=dataset, sample_id=sample_id))
    if expected_wh is not None:
        check_size(image, expected_wh, path=path, dataset=dataset, sample_id=sample_id)
    return image


def rgb_to_panoptic_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG pixels ``[H, W, 3]`` to segment ids ``R + 256*G + 256^2*B`` (int64 ``[H, W]``)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def panoptic_id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Inverse of ``rgb_to_panoptic_id``: segment ids ``[H, W]`` to uint8 ``[H, W, 3]``."""
    # The bytes of a little-endian uint32 are exactly R, G, B (and a zero high byte).
    return ids.astype("<u4").view(np.uint8).reshape(*ids.shape, 4)[..., :3].copy()


def load_panoptic_ids(
    path: str | Path, *, dataset: str, sample_id: str, expected_wh: tuple[int, int] | None = None
) -> np.ndarray:
    """Reads a COCO panoptic PNG as an int64 ``[H, W]`` map of segment ids."""
    image = load_rgb_image(path, dataset=dataset, sample_id=sample_id, expected_wh=expected_wh)
    return rgb_to_panoptic_id(np.asarray(image))


def sam_input_image(image: Image.Image, img_size: int) -> torch.Tensor:
    """uint8 ``[3, h, w]``: the RGB image resized so that its longer side is ``img_size`` (SAM's resize)."""
    resized = ResizeLongestSide(img_size).apply_image(np.asarray(image.convert("RGB")))  # [h, w, 3]
    return torch.from_numpy(resized).permute(2, 0, 1).contiguous()
