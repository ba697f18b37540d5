"""Image loading that fails loudly: every pixel is decoded here, so a broken file is caught in the dataset.

PIL opens files lazily; a truncated JPEG only fails when its pixels are read, which would otherwise happen
deep inside a processor. ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left off on purpose: a half-grey image with
a full-size mask is a wrong training sample, not a usable one.

EXIF orientation is NOT applied to dataset images: COCO annotations (RefCOCO, panoptic) are drawn on the
stored pixel grid. A person's photo (``load_photo``, ``as_displayed``: predict and ``Grounder``) is oriented
as image viewers show it, so that its masks line up with what the person sees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from segment_anything.utils.transforms import ResizeLongestSide

from flmm_lightning.data.bad_samples import BadSampleError, BadSampleReason

# Errors PIL raises for files it cannot identify or decode (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def open_image(path: str | Path, *, dataset: str, sample_id: str) -> Image.Image:
    """Opens and fully decodes ``path``; raises ``BadSampleError`` when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise BadSampleError(dataset, sample_id, str(path), BadSampleReason.MISSING_FILE, "file not found")
    try:
        with Image.open(path) as image:
            image.load()
            # The copy outlives the file handle (multi-frame formats such as MPO keep theirs open).
            return image.copy()
    except _DECODE_ERRORS as error:
        detail = f"{type(error).__name__}: {error}"
        reason = BadSampleReason.UNREADABLE_IMAGE
        raise BadSampleError(dataset, sample_id, str(path), reason, detail) from error


class UnreadableImageError(ValueError):
    """A photo handed to predict / ``Grounder`` that cannot be read (names the file)."""


# 16-bit grey levels span the whole unsigned range; PIL's own conversion clips them at 255 (white).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# 32-bit integer and float images have no nominal range: their own minimum and maximum are black and white.
_UNBOUNDED_MODES = ("I", "F")


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


def load_photo(path: str | Path) -> Image.Image:
    """Reads a person's photo fully, oriented as viewers show it (``as_displayed``); a missing, truncated or
    undecodable file raises ``UnreadableImageError`` naming it."""
    path = Path(path)
    if path.is_dir():
        raise UnreadableImageError(f"{path} is a folder: give one image file in it (image=<file>)")
    if not path.is_file():
        raise UnreadableImageError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
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
