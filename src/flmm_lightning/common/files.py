"""Writing a file atomically: readers and later runs see the old content or the new one, never a part."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, durable: bool = False, temp_name: str | None = None, mode: int | None = None
) -> Iterator[BinaryIO]:
    """Yields a binary file in ``path``'s own folder that replaces ``path`` when the block ends without an
    error; on an error it is removed and ``path`` stays as it was.

    ``durable``: the data and the rename are fsynced (a power loss keeps the old file or the whole new one),
    at the cost of waiting for the disk. ``temp_name``: the temporary file's name (a fixed name is overwritten
    by the next write of the same target if a killed process left it behind); by default a unique one, so
    that concurrent writers of one target never share it. ``mode``: the file's permissions (default: as the
    process's umask gives them).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if temp_name is None:
        partial = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        handle = partial.open("xb")
    else:
        partial = target.with_name(temp_name)
        handle = partial.open("wb")
    try:
        with handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(partial, mode)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if durable:
        # The rename itself lives in the folder: without this fsync a crash can forget it.
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
