"""Broken inputs: each raises a BadSampleError naming file and sample, or becomes a counted SkippedSample."""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from flmm_lightning.boundaries import GroundingSample, SkippedSample
from flmm_lightning.data import (
    BadSampleError,
    BadSampleReason,
    BadSampleSummary,
    PNGDataset,
    RefCocoDataset,
    UnsafePickleError,
    load_refs,
    load_rgb_image,
)

BALL_IMAGE = "000000142238"


def refcoco_val(root: Path) -> Callable[[str], Dataset]:
    # val: image 142238 (ref 1) and image 439180 (ref 6), one sample each.
    return lambda policy: RefCocoDataset(root, "refcoco", "unc", "val", "images", on_bad_sample=policy)


def png(root: Path) -> Callable[[str], Dataset]:
    return lambda policy: PNGDataset(
        root / "annotations" / "png_sample.json",
        root / "annotations" / "panoptic_sample.json",
        root / "panoptic",
        root / "images",
        on_bad_sample=policy,
    )


def check_policies(
    make: Callable[[str], Dataset], reason: BadSampleReason, path: Path, sample_id: str
) -> None:
    """raise: the error (at construction or on access) names the file and the sample; skip: one marker."""
    with pytest.raises(BadSampleError) as info:
        dataset = make("raise")
        for index in range(len(dataset)):
            dataset[index]
    error = info.value
    assert (error.reason, error.path, error.sample_id) == (reason, str(path), sample_id)
    assert str(path) in str(error) and sample_id in str(error)

    items = list(make("skip"))
    skipped = [item for item in items if isinstance(item, SkippedSample)]
    assert skipped == [SkippedSample(error.dataset, sample_id, str(path), str(reason))]
    assert len(items) == 2 and sum(isinstance(item, GroundingSample) for item in items) == 1


def test_missing_image(coco_sample: Path) -> None:
    image = coco_sample / "images" / f"{BALL_IMAGE}.jpg"
    image.unlink()
    check_policies(refcoco_val(coco_sample), BadSampleReason.MISSING_FILE, image, "image_id=142238")


def test_truncated_jpeg(coco_sample: Path) -> None:
    image = coco_sample / "images" / f"{BALL_IMAGE}.jpg"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    check_policies(refcoco_val(coco_sample), BadSampleReason.UNREADABLE_IMAGE, image, "image_id=142238")


def test_image_size_differs_from_annotation(coco_sample: Path) -> None:
    instances_path = coco_sample / "refcoco" / "instances.json"
    instances = json.loads(instances_path.read_text())
    instances["images"][0]["height"] = 480
    instances_path.write_text(json.dumps(instances))
    image = coco_sample / "images" / f"{BALL_IMAGE}.jpg"
    check_policies(refcoco_val(coco_sample), BadSampleReason.SIZE_MISMATCH, image, "image_id=142238")


def test_ann_id_not_in_instances(coco_sample: Path) -> None:
    refs_path = coco_sample / "refcoco" / "refs(unc).p"
    refs = load_refs(refs_path)
    refs[0]["ann_id"] = 999  # ref 1, val
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    check_policies(refcoco_val(coco_sample), BadSampleReason.MISSING_ANNOTATION, refs_path, "image_id=142238")
    with pytest.raises(BadSampleError, match=r"ref_id 1: ann_id 999"):
        refcoco_val(coco_sample)("raise")


def test_empty_mask(coco_sample: Path) -> None:
    instances_path = coco_sample / "refcoco" / "instances.json"
    instances = json.loads(instances_path.read_text())
    annotation = next(a for a in instances["annotations"] if a["id"] == 2628072)  # ref 1
    annotation["segmentation"] = {"size": [427, 640], "counts": [427 * 640]}  # uncompressed RLE, all zeros
    instances_path.write_text(json.dumps(instances))
    check_policies(refcoco_val(coco_sample), BadSampleReason.EMPTY_MASK, instances_path, "image_id=142238")


def edit_png_fixture(root: Path, segment_ids: list[str], extra_segment: dict | None) -> None:
    """Points the "a ball" phrase of image 142238 at ``segment_ids``; optionally declares one more segment."""
    narratives_path = root / "annotations" / "png_sample.json"
    narratives = json.loads(narratives_path.read_text())
    ball = next(s for s in narratives[0]["segments"] if s["utterance"] == "a ball")
    ball["segment_ids"] = segment_ids
    narratives_path.write_text(json.dumps(narratives))
    if extra_segment is not None:
        panoptic_path = root / "annotations" / "panoptic_sample.json"
        panoptic = json.loads(panoptic_path.read_text())
        panoptic["annotations"][0]["segments_info"].append(extra_segment)
        panoptic_path.write_text(json.dumps(panoptic))


def test_png_segment_absent_from_panoptic_png(coco_sample: Path) -> None:
    segment = {"id": 123, "category_id": 37, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 1}
    edit_png_fixture(coco_sample, ["123"], segment)
    panoptic_png = coco_sample / "panoptic" / f"{BALL_IMAGE}.png"
    check_policies(png(coco_sample), BadSampleReason.MISSING_SEGMENT, panoptic_png, "image_id=142238")


def test_png_segment_absent_from_panoptic_json(coco_sample: Path) -> None:
    edit_png_fixture(coco_sample, ["16757838", "999"], None)
    panoptic_json = coco_sample / "annotations" / "panoptic_sample.json"
    check_policies(png(coco_sample), BadSampleReason.MISSING_SEGMENT, panoptic_json, "image_id=142238")


def test_truncated_panoptic_png(coco_sample: Path) -> None:
    panoptic_png = coco_sample / "panoptic" / f"{BALL_IMAGE}.png"
    data = panoptic_png.read_bytes()
    panoptic_png.write_bytes(data[: len(data) // 2])
    check_policies(png(coco_sample), BadSampleReason.UNREADABLE_IMAGE, panoptic_png, "image_id=142238")


def test_skipped_sample_crosses_the_worker_boundary(coco_sample: Path) -> None:
    (coco_sample / "images" / f"{BALL_IMAGE}.jpg").unlink()
    dataset = refcoco_val(coco_sample)("skip")
    items = [item for batch in DataLoader(dataset, num_workers=1, collate_fn=list) for item in batch]
    assert [type(item) for item in items] == [SkippedSample, GroundingSample]
    summary = BadSampleSummary()
    summary.update(items)
    assert summary.per_reason() == {"missing file": 1}


class _CreatesFile:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (open, (str(self.target), "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    target = tmp_path / "pwned.txt"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "payload": _CreatesFile(target)}], protocol=2))

    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p.*open") as info:
        load_refs(path)
    assert str(path) in str(info.value)
    assert not target.exists()

    # The payload is real: a plain unpickler does create its file.
    control = tmp_path / "control.txt"
    loaded = pickle.loads(pickle.dumps(_CreatesFile(control), protocol=2))
    loaded.close()
    assert control.exists()


@pytest.mark.parametrize(
    ("mode", "colour", "suffix", "expected"),
    [
        ("L", 100, ".png", (100, 100, 100)),
        ("RGBA", (10, 20, 30, 0), ".png", (10, 20, 30)),
        ("CMYK", (0, 255, 255, 0), ".tif", (255, 0, 0)),
        ("CMYK", (0, 255, 255, 0), ".jpg", None),  # lossy: compared with a tolerance
    ],
)
def test_image_modes_become_rgb(tmp_path: Path, mode: str, colour, suffix: str, expected) -> None:
    path = tmp_path / f"image{suffix}"
    Image.new(mode, (12, 8), colour).save(path)

    loaded = load_rgb_image(path, dataset="test", sample_id="0", expected_wh=(12, 8))
    assert loaded.mode == "RGB" and loaded.size == (12, 8)
    if expected is None:
        assert all(abs(a - b) <= 8 for a, b in zip(loaded.getpixel((5, 4)), (255, 0, 0), strict=True))
    else:
        assert loaded.getpixel((5, 4)) == expected


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_images_become_rgb(tmp_path: Path, transparency: bool) -> None:
    path = tmp_path / "palette.png"
    image = Image.new("P", (12, 8), 1)
    image.putpalette([255, 255, 255, 0, 128, 255])
    # Per-entry alpha (a tRNS chunk): the case PIL warns about when converted straight to RGB.
    image.save(path, **({"transparency": b"\x00\x80"} if transparency else {}))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_rgb_image(path, dataset="test", sample_id="0", expected_wh=(12, 8))
    assert loaded.mode == "RGB" and loaded.getpixel((5, 4)) == (0, 128, 255)


def test_exif_orientation_is_not_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)

    loaded = load_rgb_image(path, dataset="test", sample_id="0", expected_wh=(40, 20))
    assert loaded.size == (40, 20)
    red, green, blue = loaded.getpixel((5, 10))
    assert red > 200 and blue < 50


def test_bad_sample_summary() -> None:
    summary = BadSampleSummary()
    assert str(summary) == "no skipped samples"
    summary.update(
        [
            SkippedSample("refcoco(unc)/val", "image_id=1", "/data/a.jpg", "missing file"),
            SkippedSample("refcoco(unc)/val", "image_id=2", "/data/b.jpg", "missing file"),
            "not a skipped sample",
            SkippedSample("png_val", "image_id=3", "/data/3.png", "segment absent"),
        ]
    )
    other = BadSampleSummary()
    other.add(SkippedSample("png_val", "image_id=4", "/data/4.png", "segment absent"))
    summary.merge(other)
    assert summary.total == len(summary) == 4
    assert summary.per_reason() == {"missing file": 2, "segment absent": 2}
    table = str(summary).splitlines()
    assert table[0].split() == ["dataset", "reason", "count", "example", "file"]
    assert "png_val" in table[2] and "segment absent" in table[2] and "/data/3.png" in table[2]
    assert table[-1].split() == ["total", "4"]


def test_bad_sample_error_pickles() -> None:
    error = BadSampleError("d", "image_id=1", "/x.jpg", BadSampleReason.EMPTY_MASK, "detail")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.dataset, copy.sample_id, copy.path, copy.reason, str(copy)) == (
        "d",
        "image_id=1",
        "/x.jpg",
        BadSampleReason.EMPTY_MASK,
        str(error),
    )
