"""Broken annotation files: every error names the file, the record and the field; a refs pickle that stands
for more data than it holds, or nests too deep, is refused before anything walks it."""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flmm_lightning.data import PickleLimitError, PNGDataset, RecordError, RefCocoDataset, load_refs
from flmm_lightning.data.safe_pickle import load_plain_pickle

REFS = ("refcoco", "refs(unc).p")


def edit_refs(root: Path, edit: Callable[[list[dict[str, Any]]], None]) -> Path:
    path = root.joinpath(*REFS)
    refs = load_refs(path)
    edit(refs)
    path.write_bytes(pickle.dumps(refs, protocol=2))
    return path


def edit_json(path: Path, edit: Callable[[Any], None]) -> Path:
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    return path


def refcoco(root: Path) -> RefCocoDataset:
    return RefCocoDataset(root, "refcoco", "unc", "val", "images")


def png(root: Path) -> PNGDataset:
    annotations = root / "annotations"
    return PNGDataset(
        annotations / "png_sample.json",
        annotations / "panoptic_sample.json",
        root / "panoptic",
        root / "images",
    )


def assert_names(error: RecordError, path: Path, record: str, field: str) -> None:
    assert (error.path, error.record, error.field) == (str(path), record, field)
    assert str(path) in str(error) and record in str(error) and repr(field) in str(error)


@pytest.mark.parametrize(
    ("field", "record"),
    [("sentences", "ref #0 (ref_id=1)"), ("ann_id", "ref #0 (ref_id=1)"), ("ref_id", "ref #0")],
)
def test_refs_record_without_a_field(coco_sample: Path, field: str, record: str) -> None:
    path = edit_refs(coco_sample, lambda refs: refs[0].pop(field))
    with pytest.raises(RecordError) as info:
        refcoco(coco_sample)
    assert_names(info.value, path, record, field)


def test_refs_sentence_without_raw_text(coco_sample: Path) -> None:
    path = edit_refs(coco_sample, lambda refs: refs[2]["sentences"][1].pop("raw"))
    ref_id = load_refs(path)[2]["ref_id"]
    with pytest.raises(RecordError) as info:
        refcoco(coco_sample)
    assert_names(info.value, path, f"ref #2 (ref_id={ref_id}), sentences[1]", "raw")


def test_refs_field_of_the_wrong_kind(coco_sample: Path) -> None:
    def text_ann_id(refs: list[dict[str, Any]]) -> None:
        refs[1]["ann_id"] = "twelve"

    path = edit_refs(coco_sample, text_ann_id)
    ref_id = load_refs(path)[1]["ref_id"]
    with pytest.raises(RecordError, match="must be an integer, found 'twelve'") as info:
        refcoco(coco_sample)
    assert_names(info.value, path, f"ref #1 (ref_id={ref_id})", "ann_id")


def test_instances_annotation_without_segmentation(coco_sample: Path) -> None:
    ann_id = load_refs(coco_sample.joinpath(*REFS))[0]["ann_id"]
    path = coco_sample / "refcoco" / "instances.json"
    index = next(k for k, a in enumerate(json.loads(path.read_text())["annotations"]) if a["id"] == ann_id)
    edit_json(path, lambda instances: instances["annotations"][index].pop("segmentation"))
    with pytest.raises(RecordError) as info:
        refcoco(coco_sample)
    assert_names(info.value, path, f"annotations[{index}] (id={ann_id})", "segmentation")


def test_png_segment_id_that_is_not_a_number(coco_sample: Path) -> None:
    path = coco_sample / "annotations" / "png_sample.json"
    edit_json(path, lambda narratives: narratives[0]["segments"][1]["segment_ids"].insert(2, "12a"))
    with pytest.raises(RecordError, match="must be a numeric id, found '12a'") as info:
        png(coco_sample)
    assert_names(info.value, path, "narrative #0 (image_id=142238), segments[1]", "segment_ids[2]")


def test_png_segment_without_utterance(coco_sample: Path) -> None:
    path = coco_sample / "annotations" / "png_sample.json"
    edit_json(path, lambda narratives: narratives[1]["segments"][3].pop("utterance"))
    image_id = json.loads(path.read_text())[1]["image_id"]
    with pytest.raises(RecordError) as info:
        png(coco_sample)
    assert_names(info.value, path, f"narrative #1 (image_id={image_id}), segments[3]", "utterance")


def test_panoptic_category_without_isthing(coco_sample: Path) -> None:
    path = coco_sample / "annotations" / "panoptic_sample.json"
    edit_json(path, lambda panoptic: panoptic["categories"][0].pop("isthing"))
    category_id = json.loads(path.read_text())["categories"][0]["id"]
    with pytest.raises(RecordError) as info:
        png(coco_sample)
    assert_names(info.value, path, f"categories[0] (id={category_id})", "isthing")


# ---- bounded unpickling ----------------------------------------------------------------------------------
def test_billion_laughs_refs_pickle_is_refused(tmp_path: Path) -> None:
    """Lists that each hold the previous one twice: a few hundred bytes that stand for 2^40 elements."""
    laughs: list[Any] = [{"ref_id": 0}]
    for _ in range(40):
        laughs = [laughs, laughs]
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(laughs, protocol=2))
    assert path.stat().st_size < 400
    with pytest.raises(PickleLimitError, match="more than 1,024 elements") as info:
        load_refs(path)
    assert str(path) in str(info.value)


def test_deeply_nested_refs_pickle_is_refused(tmp_path: Path) -> None:
    """100,000 nested lists, written with pickle's own opcodes (pickling it would overflow the pickler)."""
    depth = 100_000
    path = tmp_path / "refs(unc).p"
    path.write_bytes(
        pickle.PROTO + b"\x02" + pickle.EMPTY_LIST * depth + pickle.APPEND * (depth - 1) + pickle.STOP
    )
    with pytest.raises(PickleLimitError, match="nested more than 64 levels") as info:
        load_refs(path)
    assert str(path) in str(info.value)


def test_oversized_refs_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "text": "x" * 4096}], protocol=2))
    with pytest.raises(PickleLimitError, match="over the limit of 1,000 bytes"):
        load_plain_pickle(path, max_bytes=1000)


def test_real_refs_files_stay_within_the_bounds(fixtures_dir: Path) -> None:
    for path in (
        fixtures_dir / "coco_sample" / "refcoco" / "refs(unc).p",
        fixtures_dir / "refcocog_umd_annotations" / "refs(umd).p",
    ):
        refs = load_refs(path)
        assert refs and all("sentences" in ref for ref in refs)


def test_broken_json_names_the_file_and_where_it_breaks(coco_sample: Path) -> None:
    path = coco_sample / "annotations" / "png_sample.json"
    path.write_text('[\n  {"image_id": "142238",\n   "segments": [}\n]')
    with pytest.raises(ValueError, match=re.escape(f"{path}: not valid JSON at line 3, column 17")):
        png(coco_sample)


def test_deeply_nested_json_is_refused_with_a_message(coco_sample: Path) -> None:
    path = coco_sample / "refcoco" / "instances.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=re.escape(f"{path}: refused: its JSON is nested deeper")):
        refcoco(coco_sample)
