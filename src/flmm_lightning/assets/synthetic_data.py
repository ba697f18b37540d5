"""A small synthetic grounding dataset written to disk in the real RefCOCO and PNG formats.

Images hold 2-4 coloured shapes (circle, square, triangle; one colour per shape within an image, so that
every expression names exactly one shape) on textured, noisy backgrounds. The same files are read back by
``RefCocoDataset`` and ``PNGDataset``, so the demo and the tests exercise the real loaders end to end.

Layout under ``root`` (all paths in ``SyntheticPaths``)::

    images/synthetic_000001.jpg ...                        # JPEG, quality 95; every other image 4:3
    refcoco_synthetic/instances.json, refs(unc).p          # splits train / val, compressed-RLE masks
    annotations/png_{train,val}.json                       # PNG narratives
    annotations/panoptic_{train,val}.json                  # COCO panoptic json (things: shapes)
    annotations/panoptic_{train,val}/synthetic_000001.png  # panoptic PNGs (id = R + 256*G + 256^2*B)
    reasonseg/{train,val}/synthetic_000001.{jpg,json}      # ReasonSeg: the image (a hard link) + queries

Everything is a function of the parameters: same arguments, same bytes. The shapes and their drawing are in
``synthetic_shapes``, the ReasonSeg queries in ``synthetic_reasonseg``; this module writes the formats.
"""

from __future__ import annotations

import fcntl
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from flmm_lightning.assets.synthetic_reasonseg import COLOUR_THINGS, write_reasonseg
from flmm_lightning.assets.synthetic_shapes import (
    COLOURS,
    SHAPE_KINDS,
    SyntheticShape,
    place_shapes,
    render_image,
    shape_mask,
)
from flmm_lightning.data.images import panoptic_id_to_rgb

__all__ = [
    "COLOURS",
    "COLOUR_THINGS",
    "REFCOCO_DATASET",
    "REFCOCO_SPLIT_BY",
    "SHAPE_KINDS",
    "SyntheticPaths",
    "synthetic_paths",
    "write_synthetic_dataset",
]

# Part of the marker: bump it whenever the generator's output changes, so existing copies are rebuilt.
FORMAT_VERSION = 2
MARKER_NAME = "synthetic.json"
REFCOCO_DATASET = "refcoco_synthetic"
REFCOCO_SPLIT_BY = "unc"
IMAGE_DIR = "images"
REASONSEG_DIR = "reasonseg"
SPLITS = ("train", "val")
# Bounds of what one call may write: a config (or a checkpoint's) cannot fill a disk through the generator.
MAX_IMAGES = 10_000
MAX_IMAGE_SIDE = 4096
# What a folder holds before the first build: the lock file of a build that was interrupted early.
_OWN_BEFORE_BUILD = {".lock"}

CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "circle", "supercategory": "shape", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "square", "supercategory": "shape", "isthing": 1, "color": [119, 11, 32]},
    {"id": 3, "name": "triangle", "supercategory": "shape", "isthing": 1, "color": [0, 0, 142]},
    {"id": 4, "name": "background", "supercategory": "background", "isthing": 0, "color": [128, 128, 128]},
]
_CATEGORY_ID = {category["name"]: category["id"] for category in CATEGORIES}
_BACKGROUND_SEGMENT_ID = 5_000_000
# "the larger/smaller X" is only said when the sizes differ visibly.
_SIZE_RATIO_FOR_COMPARISON = 1.25
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class SyntheticPaths:
    """The files a config needs; ``refcoco_kwargs``/``png_kwargs`` give a dataset's arguments directly."""

    root: Path
    image_dir: Path
    refcoco_instances: Path
    refcoco_refs: Path
    png_narratives: dict[str, Path]
    panoptic_json: dict[str, Path]
    panoptic_dir: dict[str, Path]
    reasonseg_dir: dict[str, Path]

    def refcoco_kwargs(self, split: str) -> dict[str, Any]:
        return {
            "data_root": self.root,
            "dataset": REFCOCO_DATASET,
            "split_by": REFCOCO_SPLIT_BY,
            "split": split,
            "image_dir": IMAGE_DIR,
        }

    def png_kwargs(self, split: str) -> dict[str, Any]:
        return {
            "narratives_json": self.png_narratives[split],
            "panoptic_json": self.panoptic_json[split],
            "panoptic_dir": self.panoptic_dir[split],
            "image_dir": self.image_dir,
        }

    def reasonseg_kwargs(self, split: str) -> dict[str, Any]:
        return {"split_dir": self.reasonseg_dir[split]}


def synthetic_paths(root: str | Path) -> SyntheticPaths:
    root = Path(root)
    annotations = root / "annotations"
    return SyntheticPaths(
        root=root,
        image_dir=root / IMAGE_DIR,
        refcoco_instances=root / REFCOCO_DATASET / "instances.json",
        refcoco_refs=root / REFCOCO_DATASET / f"refs({REFCOCO_SPLIT_BY}).p",
        png_narratives={split: annotations / f"png_{split}.json" for split in SPLITS},
        panoptic_json={split: annotations / f"panoptic_{split}.json" for split in SPLITS},
        panoptic_dir={split: annotations / f"panoptic_{split}" for split in SPLITS},
        reasonseg_dir={split: root / REASONSEG_DIR / split for split in SPLITS},
    )


def write_synthetic_dataset(
    root: str | Path,
    num_train: int = 240,
    num_val: int = 60,
    image_size: tuple[int, int] = (256, 256),
    seed: int = 0,
) -> SyntheticPaths:
    """Writes the dataset under ``root`` unless the same parameters already did; returns its paths.

    ``image_size`` is (width, height) of the even-numbered images; odd-numbered ones are 3/4 as high, so
    that loaders and heads see non-square inputs. A marker file records the parameters: when it is missing
    or differs, the dataset is (re)built; a lock keeps concurrent callers (DDP ranks) from racing.

    Only this generator's own files are ever removed: a rebuild deletes the files the marker's parameters
    name (those the earlier build wrote), and folders they leave empty; a folder that holds anything but a
    marker is refused, never written into. At most ``MAX_IMAGES`` images of at most ``MAX_IMAGE_SIDE``.
    """
    _check_sizes(root, num_train, num_val, image_size)
    paths = synthetic_paths(root)
    params = {
        "version": FORMAT_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": list(image_size),
        "seed": seed,
    }
    marker = paths.root / MARKER_NAME
    if paths.root.is_dir() and not marker.is_file() and not (paths.root / ".lock").exists():
        _refuse_foreign_files(paths.root)  # before the lock file: nothing is written into a stranger's folder
    paths.root.mkdir(parents=True, exist_ok=True)
    with (paths.root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = _read_marker(marker)
        if previous == params:
            return paths
        if previous is not None:
            # Only what the earlier build wrote (its marker names the parameters) is removed.
            marker.unlink()
            _remove_build(paths, previous["num_train"], previous["num_val"])
        else:
            _refuse_foreign_files(paths.root)
        _write(paths, num_train, num_val, image_size, seed)
        marker.write_text(json.dumps(params))
    return paths


def _check_sizes(root: str | Path, num_train: Any, num_val: Any, image_size: Any) -> None:
    counts = (num_train, num_val)
    sides = tuple(image_size) if isinstance(image_size, tuple | list) else ()
    if (
        any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts)
        or sum(counts) > MAX_IMAGES
        or len(sides) != 2
        or any(isinstance(n, bool) or not isinstance(n, int) or not 16 <= n <= MAX_IMAGE_SIDE for n in sides)
    ):
        raise ValueError(
            f"synthetic dataset {root}: num_train={num_train!r}, num_val={num_val!r}, "
            f"image_size={image_size!r}: at most {MAX_IMAGES} images in all, sides from 16 to "
            f"{MAX_IMAGE_SIDE} pixels"
        )


def _refuse_foreign_files(root: Path) -> None:
    if {entry.name for entry in root.iterdir()} - _OWN_BEFORE_BUILD:
        raise FileExistsError(
            f"{root} holds files that the synthetic generator did not write (no {MARKER_NAME}): it writes "
            "only into an empty folder or one it built; choose another folder"
        )


def _read_marker(marker: Path) -> dict[str, Any] | None:
    """The parameters of the build that wrote ``marker``; None when there is none; an error for a marker this
    generator could not have written (its file list would be unbounded or unknown)."""
    if not marker.is_file():
        return None
    try:
        params = json.loads(marker.read_text())
        _check_sizes(marker.parent, params["num_train"], params["num_val"], params["image_size"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{marker}: not a marker of the synthetic generator ({error}); remove it by hand"
        ) from None
    return params


def _built_files(paths: SyntheticPaths, num_train: int, num_val: int) -> list[Path]:
    """Every file a build of ``num_train`` + ``num_val`` images writes (``_write``)."""
    files = [paths.refcoco_instances, paths.refcoco_refs]
    for split in SPLITS:
        files += [paths.png_narratives[split], paths.panoptic_json[split]]
    for index in range(num_train + num_val):
        split = "train" if index < num_train else "val"
        stem = f"synthetic_{index + 1:06d}"
        files += [paths.image_dir / f"{stem}.jpg", paths.panoptic_dir[split] / f"{stem}.png"]
        files += [paths.reasonseg_dir[split] / f"{stem}.jpg", paths.reasonseg_dir[split] / f"{stem}.json"]
    return files


def _remove_build(paths: SyntheticPaths, num_train: int, num_val: int) -> None:
    """Removes the files of an earlier build, then the folders it created where they are left empty."""
    for file in _built_files(paths, num_train, num_val):
        file.unlink(missing_ok=True)
    folders = [
        paths.image_dir,
        paths.refcoco_refs.parent,
        *paths.panoptic_dir.values(),
        paths.root / "annotations",
        *paths.reasonseg_dir.values(),
        paths.root / REASONSEG_DIR,
    ]
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _write(
    paths: SyntheticPaths, num_train: int, num_val: int, image_size: tuple[int, int], seed: int
) -> None:
    for directory in (
        paths.image_dir,
        paths.refcoco_refs.parent,
        *paths.panoptic_dir.values(),
        *paths.reasonseg_dir.values(),
    ):
        directory.mkdir(parents=True, exist_ok=True)
    coco_images: list[dict[str, Any]] = []
    coco_annotations: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    narratives: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    panoptic: dict[str, dict[str, list]] = {split: {"images": [], "annotations": []} for split in SPLITS}

    for index in range(num_train + num_val):
        split = "train" if index < num_train else "val"
        rng = np.random.default_rng([seed, index])
        image_id = index + 1
        width, height = image_size if index % 2 == 0 else (image_size[0], image_size[1] * 3 // 4)
        shapes = place_shapes(rng, width, height)
        stem = f"synthetic_{image_id:06d}"
        image_entry = {"id": image_id, "file_name": f"{stem}.jpg", "height": height, "width": width}

        masks = [shape_mask(shape, width, height) for shape in shapes]
        render_image(rng, shapes, width, height).save(paths.image_dir / f"{stem}.jpg", quality=95)
        coco_images.append(image_entry)
        for number, (shape, mask) in enumerate(zip(shapes, masks, strict=True)):
            ann_id = image_id * 10 + number
            coco_annotations.append(_coco_annotation(ann_id, image_id, shape, mask))
            refs.append(_ref(rng, len(refs) + 1, ann_id, image_id, split, stem, shape, shapes))

        segments_info, ids = _panoptic_segments(shapes, masks, width, height)
        Image.fromarray(panoptic_id_to_rgb(ids)).save(paths.panoptic_dir[split] / f"{stem}.png")
        panoptic[split]["images"].append(image_entry)
        panoptic[split]["annotations"].append(
            {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments_info}
        )
        narratives[split].append(_narrative(rng, image_id, shapes))
        # Its own random stream: the other formats' draws (and bytes) stay as they were without it.
        reasonseg_rng = np.random.default_rng([seed, index, 1])
        write_reasonseg(reasonseg_rng, paths.reasonseg_dir[split], paths.image_dir / f"{stem}.jpg", shapes)

    _renumber_sentences(refs)
    instances = {
        "info": {"description": "flmm_lightning synthetic shapes"},
        "images": coco_images,
        "annotations": coco_annotations,
        "categories": [
            {key: category[key] for key in ("id", "name", "supercategory")}
            for category in CATEGORIES
            if category["isthing"]
        ],
    }
    paths.refcoco_instances.write_text(json.dumps(instances))
    with paths.refcoco_refs.open("wb") as file:
        pickle.dump(refs, file, protocol=2)
    for split in SPLITS:
        paths.png_narratives[split].write_text(json.dumps(narratives[split]))
        document = {"info": {"description": f"flmm_lightning synthetic shapes, {split}"}, **panoptic[split]}
        document["categories"] = CATEGORIES
        paths.panoptic_json[split].write_text(json.dumps(document))


def _coco_annotation(ann_id: int, image_id: int, shape: SyntheticShape, mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": _CATEGORY_ID[shape.kind],
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }


def _position(shape: SyntheticShape, shapes: list[SyntheticShape], rng: np.random.Generator) -> str:
    candidates = []
    xs, ys = [s.cx for s in shapes], [s.cy for s in shapes]
    if shape.cx == min(xs):
        candidates.append("on the left")
    if shape.cx == max(xs):
        candidates.append("on the right")
    if shape.cy == min(ys):
        candidates.append("at the top")
    if shape.cy == max(ys):
        candidates.append("at the bottom")
    return str(rng.choice(candidates)) if candidates else "in the middle"


def _size_word(shape: SyntheticShape, shapes: list[SyntheticShape]) -> str | None:
    """'larger'/'smaller' when exactly one other shape of the same kind differs visibly in size."""
    others = [s for s in shapes if s.kind == shape.kind and s is not shape]
    if len(others) != 1:
        return None
    ratio = shape.radius / others[0].radius
    if ratio >= _SIZE_RATIO_FOR_COMPARISON:
        return "larger"
    if ratio <= 1 / _SIZE_RATIO_FOR_COMPARISON:
        return "smaller"
    return None


def _ref(
    rng: np.random.Generator,
    ref_id: int,
    ann_id: int,
    image_id: int,
    split: str,
    stem: str,
    shape: SyntheticShape,
    shapes: list[SyntheticShape],
) -> dict[str, Any]:
    sentences = [f"the {shape.colour} {shape.kind} {_position(shape, shapes, rng)}"]
    if rng.random() < 0.5:
        size = _size_word(shape, shapes)
        sentences.append(
            f"the {size} {shape.colour} {shape.kind}" if size else f"{shape.colour} {shape.kind}"
        )
        if rng.random() < 0.5:
            sentences.reverse()
    # Raw text as annotators typed it (capitals, stray spaces) so that loaders must normalise it.
    raws = [s.capitalize() + " " if rng.random() < 0.3 else s for s in sentences]
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "split": split,
        "sentences": [
            {"tokens": raw.lower().split(), "raw": raw, "sent_id": 0, "sent": " ".join(raw.lower().split())}
            for raw in raws
        ],
        "category_id": _CATEGORY_ID[shape.kind],
        "sent_ids": [],
        "file_name": f"{stem}_{ann_id}.jpg",
    }


def _renumber_sentences(refs: list[dict[str, Any]]) -> None:
    sent_id = 0
    for ref in refs:
        for sentence in ref["sentences"]:
            sent_id += 1
            sentence["sent_id"] = sent_id
        ref["sent_ids"] = [sentence["sent_id"] for sentence in ref["sentences"]]


def _panoptic_segments(
    shapes: list[SyntheticShape], masks: list[np.ndarray], width: int, height: int
) -> tuple[list[dict[str, Any]], np.ndarray]:
    ids = np.full((height, width), _BACKGROUND_SEGMENT_ID, dtype=np.int64)
    for shape, mask in zip(shapes, masks, strict=True):
        ids[mask.astype(bool)] = shape.segment_id
    segments_info = []
    for segment_id, category_id in [(_BACKGROUND_SEGMENT_ID, _CATEGORY_ID["background"])] + [
        (shape.segment_id, _CATEGORY_ID[shape.kind]) for shape in shapes
    ]:
        rle = mask_utils.encode(np.asfortranarray((ids == segment_id).astype(np.uint8)))
        segments_info.append(
            {
                "id": segment_id,
                "category_id": category_id,
                "iscrowd": 0,
                "bbox": [int(v) for v in mask_utils.toBbox(rle)],
                "area": int(mask_utils.area(rle)),
            }
        )
    return segments_info, ids


def _grounded(utterance: str, shapes: list[SyntheticShape], plural: bool) -> dict[str, Any]:
    return {
        "utterance": utterance,
        "segment_ids": [str(shape.segment_id) for shape in shapes],
        "plural": plural,
        "noun": True,
    }


def _ungrounded(utterance: str) -> dict[str, Any]:
    return {"utterance": utterance, "segment_ids": [], "plural": False, "noun": False}


def _indefinite(shape: SyntheticShape) -> str:
    article = "an" if shape.colour[0] in "aeiou" else "a"
    return f"{article} {shape.colour} {shape.kind}"


def _narrative(rng: np.random.Generator, image_id: int, shapes: list[SyntheticShape]) -> dict[str, Any]:
    """'In this picture we can see a red circle, two squares and a blue triangle on a textured background.'"""
    groups: list[dict[str, Any]] = []
    for kind in SHAPE_KINDS:
        same_kind = [shape for shape in shapes if shape.kind == kind]
        # Same-kind shapes are sometimes named together, to give the occasional plural phrase.
        if len(same_kind) > 1 and rng.random() < 0.5:
            groups.append(_grounded(f"{_NUMBER_WORDS[len(same_kind)]} {kind}s", same_kind, plural=True))
        else:
            groups.extend(_grounded(_indefinite(shape), [shape], plural=False) for shape in same_kind)
    order = rng.permutation(len(groups))
    segments = [_ungrounded(str(rng.choice(["In this picture we can see ", "This image shows "])))]
    for position, group_index in enumerate(order):
        if position > 0:
            segments.append(_ungrounded(" and " if position == len(order) - 1 else ", "))
        segments.append(groups[group_index])
    segments.append(_ungrounded(" on "))
    background = {"utterance": "a textured background", "segment_ids": [str(_BACKGROUND_SEGMENT_ID)]}
    segments.append({**background, "plural": False, "noun": True})
    segments.append(_ungrounded("."))
    if rng.random() < 0.3:
        segments.append(_ungrounded(" The picture looks a little noisy."))
    return {
        "image_id": str(image_id),
        "caption": "".join(segment["utterance"] for segment in segments),
        "segments": segments,
    }
