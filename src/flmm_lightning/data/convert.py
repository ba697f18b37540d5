"""Converts what people have into the simple format (``data/custom_format.py``).

``python -m flmm_lightning.data.convert <source> ... --out <file.jsonl>``, ``<source>`` one of:

- ``coco``: COCO instance annotations (also CVAT's "COCO 1.0" export); phrases from each annotation's
  ``caption`` / ``phrase`` field (a string or a list), else its category name;
- ``labelme``: LabelMe JSON files (polygons and rectangles; shapes sharing a label and ``group_id`` are one
  object);
- ``refcoco``: a RefCOCO / RefCOCO+ / RefCOCOg split read by ``RefCocoDataset`` (every sentence kept);
- ``png``: Panoptic Narrative Grounding read by ``PNGDataset`` (narrative records).

Image paths are written relative to the output file's folder, so that the file and its images move together.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from flmm_lightning.boundaries import NOT_GROUNDED, GroundingSample, SkippedSample
from flmm_lightning.data.bad_samples import BadSampleError
from flmm_lightning.data.custom_format import encode_mask, write_records


class ConversionError(ValueError):
    """An input the converter cannot represent (names the file and the field)."""


def _relative(image: Path, out_dir: Path) -> str:
    """The image's path relative to the output folder when it lies inside it, else absolute."""
    image, out_dir = image.resolve(), out_dir.resolve()
    return image.relative_to(out_dir).as_posix() if image.is_relative_to(out_dir) else image.as_posix()


def _phrases_of(annotation: dict[str, Any], category: str, source: str) -> list[str]:
    for key in ("caption", "phrase", "phrases"):
        if key in annotation:
            value = annotation[key]
            phrases = [value] if isinstance(value, str) else list(value)
            if not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
                raise ConversionError(
                    f"{source}: annotation {annotation.get('id')}: {key}: no non-empty phrase"
                )
            return phrases
    return [category]


def coco_records(annotations_json: Path, image_dir: Path, out_dir: Path) -> Iterator[dict[str, Any]]:
    """One record per annotated image; one object per annotation (``iscrowd`` ones marked plural)."""
    with annotations_json.open() as file:
        coco = json.load(file)
    categories = {category["id"]: category["name"] for category in coco.get("categories", [])}
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for annotation in coco["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    for image in coco["images"]:
        annotations = by_image.get(image["id"])
        if not annotations:
            continue
        objects = []
        for annotation in annotations:
            category = categories.get(annotation.get("category_id"))
            if category is None:
                raise ConversionError(
                    f"{annotations_json}: annotation {annotation['id']}: category_id "
                    f"{annotation.get('category_id')} is not in categories"
                )
            obj: dict[str, Any] = {
                "id": annotation["id"],
                "phrases": _phrases_of(annotation, category, str(annotations_json)),
                "mask": annotation["segmentation"],
                "category": category,
            }
            if annotation.get("bbox"):
                obj["box"] = [float(v) for v in annotation["bbox"]]
            if annotation.get("iscrowd"):
                obj["plural"] = True
            objects.append(obj)
        yield {
            "id": image["id"],
            "image": _relative(image_dir / image["file_name"], out_dir),
            "width": image["width"],
            "height": image["height"],
            "objects": objects,
        }


def _labelme_polygon(shape: dict[str, Any], source: str, index: int) -> list[float]:
    points = shape.get("points") or []
    kind = shape.get("shape_type") or "polygon"
    if kind == "rectangle" and len(points) == 2:
        (x0, y0), (x1, y1) = points
        x0, x1, y0, y1 = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
        return [x0, y0, x1, y0, x1, y1, x0, y1]
    if kind == "polygon" and len(points) >= 3:
        return [float(coordinate) for point in points for coordinate in point]
    raise ConversionError(
        f"{source}: shapes[{index}] ({shape.get('label')!r}): shape_type {kind!r} with {len(points)} points "
        "cannot be a mask (polygons of 3+ points and rectangles can)"
    )


def labelme_records(files: Iterable[Path], out_dir: Path) -> Iterator[dict[str, Any]]:
    """One record per LabelMe file; the label of each shape is its phrase."""
    for path in files:
        with path.open() as file:
            data = json.load(file)
        source = str(path)
        objects: dict[tuple[str, Any], dict[str, Any]] = {}
        for index, shape in enumerate(data.get("shapes", [])):
            label = shape.get("label")
            if not isinstance(label, str) or not label.strip():
                raise ConversionError(f"{source}: shapes[{index}].label: must be a non-empty phrase")
            group = shape.get("group_id")
            key = (label, group if group is not None else f"shape{index}")
            obj = objects.setdefault(key, {"id": len(objects), "phrases": [label], "mask": []})
            obj["mask"].append(_labelme_polygon(shape, source, index))
        if not objects:
            raise ConversionError(f"{source}: shapes: no shape to convert")
        image = data.get("imagePath")
        if not isinstance(image, str) or not image:
            raise ConversionError(
                f"{source}: imagePath: missing (an image only embedded as imageData is not read)"
            )
        yield {
            "id": path.stem,
            # LabelMe on Windows writes backslashes
            "image": _relative(path.parent / image.replace("\\", "/"), out_dir),
            "width": int(data["imageWidth"]),
            "height": int(data["imageHeight"]),
            "objects": list(objects.values()),
        }


def sample_record(sample: GroundingSample, image: Path, out_dir: Path) -> dict[str, Any]:
    """A loader's sample as a record: consecutive objects with the same id (one ref's sentences) become
    one object with several phrases; a narrative becomes a caption with a span per grounded utterance."""
    record: dict[str, Any] = {
        "id": sample.image_id,
        "image": _relative(image, out_dir),
        "width": sample.image.width,
        "height": sample.image.height,
    }
    masks = sample.masks.numpy()
    flags = {
        "is_thing": [bool(v) for v in sample.is_thing],
        "plural": [bool(v) for v in sample.is_plural],
    }
    if sample.narrative:
        caption, objects = "", []
        for text, index in sample.utterances:
            if index != NOT_GROUNDED:
                objects.append(
                    {
                        "id": sample.object_ids[index],
                        "span": [len(caption), len(caption) + len(text)],
                        "mask": encode_mask(masks[index]),
                        **{name: values[index] for name, values in flags.items()},
                    }
                )
            caption += text
        return {**record, "caption": caption, "objects": objects}
    objects = []
    for k, (phrase, object_id) in enumerate(zip(sample.phrases, sample.object_ids, strict=True)):
        if objects and objects[-1]["id"] == object_id:
            objects[-1]["phrases"].append(phrase)
            continue
        objects.append(
            {
                "id": object_id,
                "phrases": [phrase],
                "mask": encode_mask(masks[k]),
                **{name: values[k] for name, values in flags.items()},
            }
        )
    return {**record, "objects": objects}


def dataset_records(dataset: Any, image_dir: Path, out_dir: Path) -> Iterator[dict[str, Any]]:
    for index in tqdm(range(len(dataset)), desc="converting", unit="image", disable=not sys.stderr.isatty()):
        sample = dataset[index]
        if isinstance(sample, SkippedSample):
            raise ConversionError(f"{sample.path}: sample {sample.sample_id}: {sample.reason}")
        yield sample_record(sample, image_dir / sample.file_name, out_dir)


def refcoco_records(
    data_root: Path, dataset: str, split_by: str, split: str, image_dir: str, out_dir: Path
) -> Iterator[dict[str, Any]]:
    from flmm_lightning.data.refcoco import RefCocoDataset

    refs = RefCocoDataset(
        data_root, dataset, split_by, split, image_dir, text_mode="all", group_by_image=True
    )
    return dataset_records(refs, refs.image_root, out_dir)


def png_records(
    narratives_json: Path, panoptic_json: Path, panoptic_dir: Path, image_dir: Path, out_dir: Path
) -> Iterator[dict[str, Any]]:
    from flmm_lightning.data.png import PNGDataset

    narratives = PNGDataset(narratives_json, panoptic_json, panoptic_dir, image_dir)
    return dataset_records(narratives, image_dir, out_dir)


def _labelme_files(inputs: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in inputs:
        files.extend(sorted(path.glob("*.json")) if path.is_dir() else [path])
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flmm_lightning.data.convert",
        description="Converts annotations into the simple format (docs/own-data.md).",
    )
    sources = parser.add_subparsers(dest="source", required=True)
    coco = sources.add_parser("coco", help="COCO instance annotations (CVAT 'COCO 1.0' export too)")
    coco.add_argument("--annotations", type=Path, required=True, help="instances JSON")
    coco.add_argument("--images", type=Path, required=True, help="folder of the images' file_name")
    labelme = sources.add_parser("labelme", help="LabelMe JSON files")
    labelme.add_argument("inputs", type=Path, nargs="+", help="LabelMe JSON files or folders of them")
    refcoco = sources.add_parser("refcoco", help="a RefCOCO-family split (refer API layout)")
    refcoco.add_argument("--data-root", type=Path, required=True)
    refcoco.add_argument("--dataset", required=True, help="refcoco, refcoco+ or refcocog")
    refcoco.add_argument("--split-by", required=True, help="unc, umd or google")
    refcoco.add_argument("--split", required=True)
    refcoco.add_argument("--image-dir", required=True, help="image folder, relative to --data-root")
    png = sources.add_parser("png", help="Panoptic Narrative Grounding")
    png.add_argument("--narratives", type=Path, required=True)
    png.add_argument("--panoptic-json", type=Path, required=True)
    png.add_argument("--panoptic-dir", type=Path, required=True)
    png.add_argument("--images", type=Path, required=True)
    for sub in (coco, labelme, refcoco, png):
        sub.add_argument("--out", type=Path, required=True, help="the JSON Lines file to write")
    args = parser.parse_args(argv)
    out_dir = args.out.parent
    if args.source == "coco":
        records = coco_records(args.annotations, args.images, out_dir)
    elif args.source == "labelme":
        records = labelme_records(_labelme_files(args.inputs), out_dir)
    elif args.source == "refcoco":
        records = refcoco_records(
            args.data_root, args.dataset, args.split_by, args.split, args.image_dir, out_dir
        )
    else:
        records = png_records(args.narratives, args.panoptic_json, args.panoptic_dir, args.images, out_dir)
    try:
        listed = list(records)
    except (ConversionError, BadSampleError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(
            f"error: {args.source}: cannot read the input: {type(error).__name__}: {error}", file=sys.stderr
        )
        return 1
    count = write_records(listed, args.out)
    objects = sum(len(record["objects"]) for record in listed)
    print(f"wrote {count} records ({objects} objects) to {args.out}")
    print(f"next: python -m flmm_lightning.data.check {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
