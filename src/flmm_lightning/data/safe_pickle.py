"""Loading the refer API's ``refs(<split_by>).p`` pickles without letting them run code.

A pickle can name any importable callable and have the unpickler call it (``__reduce__``). Refs files only
hold lists, dicts, strings and numbers, which pickle encodes with opcodes of their own; so the unpickler
below refuses every global, and a file that needs one is rejected before anything it names is imported.

Plain data can still be hostile: a few hundred bytes of lists that reference each other ("billion laughs")
stand for more elements than memory holds, and a deeply nested list overflows any recursive walk. So the file
size is bounded, and the loaded data is measured (an iterative walk that stops at the first limit) before
anything walks it recursively: at most ``MAX_DEPTH`` levels, at most as many elements as the file has bytes.
Without shared containers every element costs at least one byte of the file, so a real refs file is far
below that bound; only a container referenced many times exceeds it.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

# A refs file of RefCOCO, RefCOCO+ or RefCOCOg is tens of MB; its data is five levels deep.
MAX_BYTES = 1 << 30
MAX_DEPTH = 64
# Elements a file of n bytes may hold: n, plus room for the smallest files.
MIN_ELEMENT_LIMIT = 1024


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that references a global (a class or a function) where only plain data is expected."""


class PickleLimitError(pickle.UnpicklingError):
    """A pickle of plain data over a size, nesting-depth or element-count limit."""


def _check_bounds(data: Any, path: Path, max_elements: int, max_depth: int) -> None:
    """Walks ``data`` without recursion, counting a container once for each place it is referenced from,
    and raises ``PickleLimitError`` at the first element over ``max_elements`` or level over ``max_depth``."""
    count = 0
    pending: list[tuple[Any, int]] = [(data, 1)]
    while pending:
        value, depth = pending.pop()
        count += 1
        if count > max_elements:
            raise PickleLimitError(
                f"{path}: refused: it stands for more than {max_elements:,} elements, more than its "
                f"{path.stat().st_size:,} bytes can hold without lists or dicts that reference each other "
                "many times"
            )
        if depth > max_depth:
            raise PickleLimitError(f"{path}: refused: its data is nested more than {max_depth} levels deep")
        if isinstance(value, list | tuple):
            pending.extend((item, depth + 1) for item in value)
        elif isinstance(value, dict):
            pending.extend((item, depth + 1) for pair in value.items() for item in pair)


class _PlainDataUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        # Python 2 pickles store ``str`` as bytes; they are decoded in ``_decode_bytes``, after loading,
        # so that UTF-8 text is read as UTF-8 rather than forced through one fixed codec here.
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"{self._path}: refuses to load a pickle that references {module}.{name}; "
            "a refs file holds only lists, dicts, strings and numbers"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._path}: refuses to load a pickle with persistent ids")


def _decode_bytes(value: Any) -> Any:
    """Python 2 ``str`` values (loaded as bytes) to ``str``: UTF-8 when valid, else Latin-1."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, list):
        return [_decode_bytes(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_decode_bytes(item) for item in value)
    if isinstance(value, dict):
        return {_decode_bytes(key): _decode_bytes(item) for key, item in value.items()}
    return value


def load_plain_pickle(path: str | Path, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Loads a pickle of plain data only (no globals), with Python 2 byte strings decoded to ``str``.

    Refused with ``PickleLimitError``: a file over ``max_bytes``, data nested over ``max_depth`` levels, or
    more elements than the file has bytes (see the module's docstring)."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise PickleLimitError(f"{path}: refused: {size:,} bytes, over the limit of {max_bytes:,} bytes")
    with path.open("rb") as file:
        try:
            data = _PlainDataUnpickler(file, path).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as error:
            detail = f"{type(error).__name__}: {error}"
            raise pickle.UnpicklingError(f"{path}: not a readable pickle ({detail})") from error
    _check_bounds(data, path, max(size, MIN_ELEMENT_LIMIT), max_depth)
    return _decode_bytes(data)


def load_refs(path: str | Path) -> list[dict[str, Any]]:
    """Loads a refer API refs file: a list of ref dicts (``ref_id``, ``ann_id``, ``split``, ``sentences``)."""
    refs = load_plain_pickle(path)
    if not isinstance(refs, list) or not all(isinstance(ref, dict) for ref in refs):
        raise ValueError(f"{path}: expected a list of ref dicts, found {type(refs).__name__}")
    return refs
