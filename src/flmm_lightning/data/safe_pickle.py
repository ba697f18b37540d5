"""Loading the refer API's ``refs(<split_by>).p`` pickles without letting them run code.

A pickle can name any importable callable and have the unpickler call it (``__reduce__``). Refs files only
hold lists, dicts, strings and numbers, which pickle encodes with opcodes of their own; so the unpickler
below refuses every global, and a file that needs one is rejected before anything it names is imported.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that references a global (a class or a function) where only plain data is expected."""


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


def load_plain_pickle(path: str | Path) -> Any:
    """Loads a pickle of plain data only (no globals), with Python 2 byte strings decoded to ``str``."""
    path = Path(path)
    with path.open("rb") as file:
        try:
            data = _PlainDataUnpickler(file, path).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as error:
            detail = f"{type(error).__name__}: {error}"
            raise pickle.UnpicklingError(f"{path}: not a readable pickle ({detail})") from error
    return _decode_bytes(data)


def load_refs(path: str | Path) -> list[dict[str, Any]]:
    """Loads a refer API refs file: a list of ref dicts (``ref_id``, ``ann_id``, ``split``, ``sentences``)."""
    refs = load_plain_pickle(path)
    if not isinstance(refs, list) or not all(isinstance(ref, dict) for ref in refs):
        raise ValueError(f"{path}: expected a list of ref dicts, found {type(refs).__name__}")
    return refs
