"""The JSON files predict, chat and the app write: always valid JSON (no NaN or infinity, which ``json``
would otherwise write as bare ``NaN``), an empty mask's box ``null``, and each of these said in a notice."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any


def finite_values(value: Any, where: str = "") -> tuple[Any, list[str]]:
    """``value`` (nested dicts, lists, numbers, text) with every NaN or infinite float replaced by None, and
    the places replaced (``objects[0].mask_score``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [where or "the value"]
    if isinstance(value, Mapping):
        cleaned, places = {}, []
        for key, item in value.items():
            cleaned[key], found = finite_values(item, f"{where}.{key}" if where else str(key))
            places += found
        return cleaned, places
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        cleaned, places = [], []
        for index, item in enumerate(value):
            item, found = finite_values(item, f"{where}[{index}]")
            cleaned.append(item)
            places += found
        return cleaned, places
    return value, []


def empty_mask_notices(records: Sequence[Mapping[str, Any]], label: str = "phrase") -> list[str]:
    """One notice per record whose mask is empty (area 0: no pixel above the threshold), naming it."""
    return [
        f"no mask for {record[label]!r}: no pixel of the image was assigned to it (its box is null)"
        for record in records
        if record["area"] == 0
    ]


def json_document(document: Mapping[str, Any], notices: Sequence[str] = ()) -> tuple[str, list[str]]:
    """The text of ``document`` as a JSON file, with its ``notices`` (those given, then one per non-finite
    number replaced by null) stored under ``"notices"``; returns the text and the notices."""
    cleaned, places = finite_values(dict(document))
    notices = [
        *notices,
        *(f"{place} was not a finite number (NaN or infinity): written as null" for place in places),
    ]
    text = json.dumps({**cleaned, "notices": notices}, indent=2, ensure_ascii=False, allow_nan=False)
    return text + "\n", notices
