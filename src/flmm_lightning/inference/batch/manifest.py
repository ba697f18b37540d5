"""What a batch prediction runs on: a manifest read into one ``ManifestEntry`` per input.

Three formats: a JSONL file (one input per line: ``{"image": ..., "phrases": [...]}`` or
``{"image": ..., "query": ...}``, optional ``"id"``), a folder of images (one phrase list or query for
all), or a COCO-style annotation file (``images`` with ``file_name``; phrases from each image's captions,
else from the categories of its annotations, else the shared ones). Relative image paths resolve against
the manifest's folder (or ``image_dir``). A line that cannot be an input (not JSON, no image, no phrases)
is still an entry, carrying the reason: it becomes an error line of the output, and the run goes on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image


class ManifestError(ValueError):
    """A manifest that cannot be read at all (missing, an unknown format, no phrases for a folder)."""


@dataclass(frozen=True)
class ManifestEntry:
    """One input of a batch prediction."""

    index: int  # position in the manifest: the output's order
    id: str  # unique in the manifest: what a resumed run recognises as done
    image: str  # the image file, resolved
    phrases: tuple[str, ...] | None = None  # ground these phrases ...
    query: str | None = None  # ... or segment what the LMM's answer to this query names
    error: str | None = None  # why this input cannot run (a bad manifest line); None: it can


def phrase_problem(phrases: Any) -> str | None:
    """Why ``phrases`` (a list of strings, or one string) cannot be grounded; None when it can."""
    if isinstance(phrases, str):
        phrases = [phrases]
    if not isinstance(phrases, list) or not phrases:
        return f"phrases must be a non-empty list of strings, got {json.dumps(phrases)}"
    for index, phrase in enumerate(phrases):
        if not isinstance(phrase, str) or not phrase.strip():
            return f"phrase {index} is {'blank' if isinstance(phrase, str) else 'not text'}: {phrase!r}"
    return None


def read_manifest(
    path: str | Path,
    phrases: Sequence[str] | None = None,
    query: str | None = None,
    image_dir: str | Path | None = None,
) -> list[ManifestEntry]:
    """The inputs ``path`` names, in order. ``phrases`` / ``query``: what to ground in every image of a
    folder, and in every image of a COCO file that has no captions or annotations of its own;
    ``image_dir``: where relative image paths point (default: the manifest's folder)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"inputs={path}: no such file or folder")
    shared = _shared_request(phrases, query, path)
    if path.is_dir():
        return _folder_entries(path, shared)
    root = Path(image_dir) if image_dir is not None else path.parent
    if path.suffix.lower() == ".jsonl":
        if shared != (None, None):
            raise ManifestError(
                f"inputs={path}: each line of a JSONL manifest names its own phrases or query; phrases= and "
                "query= are for a folder of images or a COCO-style file"
            )
        return _jsonl_entries(path, root)
    if path.suffix.lower() == ".json":
        return _coco_entries(path, root, shared)
    raise ManifestError(
        f"inputs={path}: give a .jsonl file (one input per line), a COCO-style .json file or a folder "
        "of images"
    )


def _shared_request(
    phrases: Sequence[str] | None, query: str | None, source: Path
) -> tuple[tuple[str, ...] | None, str | None]:
    if phrases is not None and query is not None:
        raise ManifestError("give phrases=[...] or query='...' for the images of inputs=, not both")
    if phrases is not None:
        phrases = list(phrases)
        problem = phrase_problem(phrases)
        if problem is not None:
            raise ManifestError(f"phrases= for the images of {source}: {problem}")
        return tuple(phrases), None
    if query is not None and not str(query).strip():
        raise ManifestError(f"query= for the images of {source} is blank")
    return None, None if query is None else str(query)


def _folder_entries(folder: Path, shared: tuple[tuple[str, ...] | None, str | None]) -> list[ManifestEntry]:
    phrases, query = shared
    if phrases is None and query is None:
        raise ManifestError(
            f"inputs={folder} is a folder of images: say what to ground in each with phrases=[...] or "
            "query='...'"
        )
    extensions = {suffix.lower() for suffix in Image.registered_extensions()}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    if not files:
        raise ManifestError(f"inputs={folder}: no image files in it (by extension)")
    return [
        ManifestEntry(index, file.relative_to(folder).as_posix(), str(file), phrases, query)
        for index, file in enumerate(files)
    ]


def _jsonl_entries(path: Path, root: Path) -> list[ManifestEntry]:
    entries: list[ManifestEntry] = []
    first_line_of: dict[str, int] = {}
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            entry = _jsonl_entry(len(entries), number, line, root, path)
            if entry.id in first_line_of:
                entry = ManifestEntry(
                    entry.index,
                    f"{entry.id}@line{number}",
                    entry.image,
                    error=f"{path.name} line {number}: id {entry.id!r} is already used on line "
                    f"{first_line_of[entry.id]}",
                )
            first_line_of.setdefault(entry.id, number)
            entries.append(entry)
    if not entries:
        raise ManifestError(f"inputs={path}: the manifest has no lines")
    return entries


def _jsonl_entry(index: int, number: int, line: str, root: Path, path: Path) -> ManifestEntry:
    where = f"{path.name} line {number}"
    default_id = f"line{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return ManifestEntry(index, default_id, "", error=f"{where}: not JSON ({error.msg})")
    if not isinstance(record, dict):
        return ManifestEntry(
            index, default_id, "", error=f"{where}: expected a JSON object, got {line.strip()}"
        )
    entry_id = str(record["id"]) if record.get("id") is not None else default_id
    image = record.get("image")
    if not isinstance(image, str) or not image.strip():
        return ManifestEntry(index, entry_id, "", error=f'{where}: no "image" (a path)')
    image_path = str(root / image)
    has_phrases, has_query = "phrases" in record, "query" in record
    if has_phrases == has_query:
        given = "both" if has_phrases else "neither"
        problem = f'{where}: give exactly one of "phrases" and "query", {given} given'
        return ManifestEntry(index, entry_id, image_path, error=problem)
    if has_query:
        query = record["query"]
        if not isinstance(query, str) or not query.strip():
            return ManifestEntry(
                index, entry_id, image_path, error=f"{where}: the query is blank or not text"
            )
        return ManifestEntry(index, entry_id, image_path, query=query)
    phrases = record["phrases"]
    problem = phrase_problem(phrases)
    if problem is not None:
        return ManifestEntry(index, entry_id, image_path, error=f"{where}: {problem}")
    phrases = [phrases] if isinstance(phrases, str) else phrases
    return ManifestEntry(index, entry_id, image_path, phrases=tuple(phrases))


def _coco_entries(
    path: Path, root: Path, shared: tuple[tuple[str, ...] | None, str | None]
) -> list[ManifestEntry]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"inputs={path}: not a JSON file ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise ManifestError(f'inputs={path}: a COCO-style file needs an "images" list')
    categories = {c.get("id"): c.get("name") for c in document.get("categories", []) if isinstance(c, dict)}
    named: dict[Any, list[str]] = {}
    for annotation in document.get("annotations", []):
        if not isinstance(annotation, dict):
            continue
        text = annotation.get("caption", categories.get(annotation.get("category_id")))
        phrases = named.setdefault(annotation.get("image_id"), [])
        if isinstance(text, str) and text.strip() and text not in phrases:
            phrases.append(text)
    phrases, query = shared
    entries = []
    for index, image in enumerate(document["images"]):
        where = f"{path.name} images[{index}]"
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str):
            entries.append(ManifestEntry(index, f"images[{index}]", "", error=f'{where}: no "file_name"'))
            continue
        entry_id = str(image.get("id", image["file_name"]))
        image_path = str(root / image["file_name"])
        own = named.get(image.get("id"))
        if own:
            entries.append(ManifestEntry(index, entry_id, image_path, phrases=tuple(own)))
        elif phrases is not None or query is not None:
            entries.append(ManifestEntry(index, entry_id, image_path, phrases=phrases, query=query))
        else:
            problem = f"{where}: no captions or annotations name anything to ground (or pass phrases=[...])"
            entries.append(ManifestEntry(index, entry_id, image_path, error=problem))
    if not entries:
        raise ManifestError(f'inputs={path}: the "images" list is empty')
    return entries
