"""Images that are small on disk and huge once decoded, written without ever holding their pixels."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

# PNG colour types: 0 grey, 2 RGB (truecolour).
GREY, RGB = 0, 2
_CHANNELS = {GREY: 1, RGB: 3}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_zero_png(path: Path, width: int, height: int, bit_depth: int = 8, colour_type: int = RGB) -> Path:
    """A black PNG of ``width`` x ``height``: every row is the filter byte 0 and zeros, compressed one row at
    a time (memory: one row)."""
    row = bytes(1 + width * _CHANNELS[colour_type] * bit_depth // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    chunks = _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path


def sixteen_bit_bomb(folder: Path) -> Path:
    """The issue's reproduction: a 16-bit grey PNG of 13000x13000 (about 350 KB)."""
    return write_zero_png(folder / "grey16_13000.png", 13000, 13000, bit_depth=16, colour_type=GREY)


def rgb_bomb(folder: Path) -> Path:
    """The issue's second reproduction: an 8-bit RGB PNG of 9000x9000 (about 250 KB)."""
    return write_zero_png(folder / "rgb_9000.png", 9000, 9000)
