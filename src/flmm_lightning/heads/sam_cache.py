"""Optional on-disk cache of SAM image embeddings, so that epochs after the first skip the frozen encoder.

The encoder is frozen and its input is a deterministic function of the image, so its output can be reused.
An entry is keyed by the exact uint8 input tensor (content hash, which includes its size) and by the encoder's
identity (a hash of its state dict and input size); the entry file carries both in a header together with the
payload's shape and checksum, so a stale entry (written by another encoder) or a corrupt one (truncated, wrong
shape, flipped bytes) is detected and recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flmm_lightning.common.files import atomic_write

logger = logging.getLogger(__name__)

MAGIC = b"FLMMSAM\x00"
FORMAT_VERSION = 1
_HEADER_LENGTH = struct.Struct("<I")  # little-endian uint32: byte length of the JSON header that follows


def image_key(image: torch.Tensor) -> str:
    """Content hash of a uint8 image tensor ``[3, h, w]`` (its size included).

    A tensor on an accelerator is copied to the host first, which waits for the device: callers on the hot
    path should hand over images that are still on the CPU.
    """
    if image.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    pixels = image.detach().cpu().contiguous().numpy()
    digest = hashlib.sha256(f"{tuple(pixels.shape)}".encode())
    digest.update(memoryview(pixels).cast("B"))
    return digest.hexdigest()


def encoder_identity(encoder: nn.Module, input_size: int) -> str:
    """Hash of an image encoder's class, input size and state dict (names, dtypes, shapes and values).

    Hashes every weight once (about a second for ViT-H); callers compute it once and keep it.
    """
    digest = hashlib.sha256(f"{type(encoder).__qualname__}|{input_size}".encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # Viewed as bytes: numpy has no bfloat16.
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        digest.update(memoryview(raw).cast("B"))
    return digest.hexdigest()


@dataclass
class CacheStats:
    """What the cache did since it was created (or since ``reset``)."""

    hits: int = 0
    misses: int = 0  # no entry
    stale: int = 0  # an entry written for another encoder (or another image under the same name)
    corrupt: int = 0  # unreadable: truncated, bad header, wrong shape or checksum
    writes: int = 0

    def reset(self) -> None:
        self.hits = self.misses = self.stale = self.corrupt = self.writes = 0


class SamEmbeddingCache:
    """SAM image embeddings on disk, in float16, one file per image: ``<directory>/<k[:2]>/<k>.emb``.

    Disk cost per image is the embedding size in fp16 plus a header of about 300 bytes: SAM ViT-B/L/H give
    ``256 x 64 x 64`` values, 2 MiB per image (about 200 GiB per 100,000 images); the tiny test SAM gives
    ``64 x 16 x 16``, 32 KiB. An entry is replaced in place when the encoder changes, so the directory holds
    one entry per distinct image whatever the number of encoders it has seen; delete it to reclaim the space.

    Entries are written to a temporary file in the same folder and renamed into place, so a reader never sees
    a half-written entry and concurrent writers (DDP ranks) of the same image simply race to the same content.
    File layout: ``MAGIC``, uint32 header length, JSON header (version, image key, encoder identity, shape,
    dtype, payload byte count, CRC-32 of the payload), payload (C-order float16).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()
        self.stats = CacheStats()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.emb"

    def load(self, key: str, encoder_id: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The float16 CPU embedding ``shape`` stored for ``key`` by ``encoder_id``, or None.

        None when there is no entry or when it is stale or corrupt (counted in ``stats``).
        """
        try:
            data = self.path(key).read_bytes()
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        header, payload = self._parse(data)
        if header is None:
            self._count_corrupt(key)
            return None
        if header.get("key") != key or header.get("encoder") != encoder_id:
            self.stats.stale += 1
            return None
        expected_bytes = int(np.prod(shape)) * 2
        if (
            header.get("shape") != list(shape)
            or header.get("dtype") != "float16"
            or header.get("nbytes") != expected_bytes
            or len(payload) != expected_bytes
            or zlib.crc32(payload) != header.get("crc32")
        ):
            self._count_corrupt(key)
            return None
        self.stats.hits += 1
        # bytearray: a writable buffer, so torch does not warn about (or share) read-only memory.
        return torch.frombuffer(bytearray(payload), dtype=torch.float16).reshape(shape)

    def store(self, key: str, encoder_id: str, embedding: torch.Tensor) -> None:
        """Writes one embedding ``[C, He, We]`` (any dtype; stored as float16) atomically."""
        values = embedding.detach().to(device="cpu", dtype=torch.float16).contiguous()
        payload = memoryview(values.numpy()).cast("B")
        header = {
            "version": FORMAT_VERSION,
            "key": key,
            "encoder": encoder_id,
            "shape": list(values.shape),
            "dtype": "float16",
            "nbytes": payload.nbytes,
            "crc32": zlib.crc32(payload),
        }
        header_bytes = json.dumps(header, sort_keys=True).encode()
        # mode 0644: a shared cache stays readable to other users whatever their umask
        with atomic_write(self.path(key), mode=0o644) as handle:
            handle.write(MAGIC)
            handle.write(_HEADER_LENGTH.pack(len(header_bytes)))
            handle.write(header_bytes)
            handle.write(payload)
        self.stats.writes += 1

    @staticmethod
    def _parse(data: bytes) -> tuple[dict | None, memoryview]:
        """(header, payload) of an entry file; header None when its framing is broken."""
        start = len(MAGIC) + _HEADER_LENGTH.size
        if len(data) < start or not data.startswith(MAGIC):
            return None, memoryview(b"")
        (header_length,) = _HEADER_LENGTH.unpack_from(data, len(MAGIC))
        if len(data) < start + header_length:
            return None, memoryview(b"")
        try:
            header = json.loads(data[start : start + header_length])
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None, memoryview(b"")
        if not isinstance(header, dict) or header.get("version") != FORMAT_VERSION:
            return None, memoryview(b"")
        return header, memoryview(data)[start + header_length :]

    def _count_corrupt(self, key: str) -> None:
        if self.stats.corrupt == 0:
            logger.warning("SAM embedding cache: corrupt entry %s, recomputing it", self.path(key))
        self.stats.corrupt += 1
