"""Reading the fields of an annotation file's records: an error names the file, the record and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RecordError(ValueError):
    """A record of an annotation file without a field it needs, or with a value of the wrong kind."""

    def __init__(self, path: str | Path, record: str, field: str, problem: str) -> None:
        self.path = str(path)
        self.record = record
        self.field = field
        super().__init__(f"{path}: {record}: field {field!r} {problem}")


def read_json(path: str | Path) -> Any:
    """A JSON annotation file; one that is not valid JSON (or nests deeper than the parser can follow) raises
    ``ValueError`` naming the file and where it breaks."""
    try:
        with Path(path).open("rb") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path}: not valid JSON: not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    except RecursionError:
        raise ValueError(f"{path}: refused: its JSON is nested deeper than the parser follows") from None


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", str: "a string", list: "a list", dict: "an object", bool: "true or false"}
    return " or ".join(names.get(kind, kind.__name__) for kind in kinds)


def read_field(record: Any, field: str, kinds: tuple[type, ...], path: str | Path, where: str) -> Any:
    """``record[field]``, checked to be one of ``kinds`` (a bool is not an integer here); ``where`` names the
    record (e.g. ``ref #3 (ref_id=17)``)."""
    if not isinstance(record, dict):
        raise RecordError(path, where, field, f"cannot be read: the record is a {type(record).__name__}")
    if field not in record:
        raise RecordError(path, where, field, "is missing")
    value = record[field]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise RecordError(path, where, field, f"must be {_kind_names(kinds)}, found {value!r:.80}")
    return value


def parse_id(value: Any, path: str | Path, where: str, field: str) -> int:
    """An integer id, written as a number or as a string of digits (PNG's narratives write ids as text);
    ``field`` names where ``value`` was read from."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise RecordError(path, where, field, f"must be a numeric id, found {value!r:.80}")


def read_records(container: Any, field: str, path: str | Path, where: str = "the file") -> list[Any]:
    """``container[field]``, a list of records (``instances.json``'s ``images``, ...)."""
    return read_field(container, field, (list,), path, where)
