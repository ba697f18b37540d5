"""Bring your own data: the simple format, its converters, its validator, and fine-tuning on it.

The fixture COCO photos stand in for a person's own annotated photos (docs/own-data.md)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from flmm_lightning.boundaries import NOT_GROUNDED, GroundingSample, SkippedSample
from flmm_lightning.config.errors import ConfigError
from flmm_lightning.core import CheckpointMismatchError
from flmm_lightning.data import BadSampleError, PNGDataset, RefCocoDataset
from flmm_lightning.data import check as check_cli
from flmm_lightning.data import convert as convert_cli
from flmm_lightning.data.convert import ConversionError
from flmm_lightning.data.custom import CustomDataset
from flmm_lightning.data.custom_format import FormatError, encode_mask
from flmm_lightning.eval import evaluate
from flmm_lightning.predict import predict
from flmm_lightning.runs.build import build_datamodule, build_module, build_prompt_builder, run_config
from flmm_lightning.runs.checkpoints import check_init_from, initialize_from, load_checkpoint
from flmm_lightning.train import train

PHOTO = "images/000000142238.jpg"
NARRATIVE_SET_TARGET = "flmm_lightning.data.custom.CustomDataset"


def convert_coco(coco_sample: Path, out: Path) -> list[dict]:
    """The fixture photos' COCO instance annotations (category names as phrases) in the simple format."""
    code = convert_cli.main(
        [
            "coco",
            "--annotations",
            str(coco_sample / "refcoco" / "instances.json"),
            "--images",
            str(coco_sample / "images"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def png_paths(root: Path) -> dict[str, Path]:
    return {
        "--narratives": root / "annotations" / "png_sample.json",
        "--panoptic-json": root / "annotations" / "panoptic_sample.json",
        "--panoptic-dir": root / "panoptic",
        "--images": root / "images",
    }


def convert_png(root: Path, out: Path) -> Path:
    """The fixture photos' Panoptic Narrative Grounding annotations as narrative records."""
    arguments = [str(value) for pair in png_paths(root).items() for value in pair]
    assert convert_cli.main(["png", *arguments, "--out", str(out)]) == 0
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# ---------------------------------------------------------------------------------------------- validator
def _set(field: str, value: object) -> Callable[[dict, Path], None]:
    def mutate(record: dict, folder: Path) -> None:
        record[field] = value

    return mutate


def _set_object(field: str, value: object) -> Callable[[dict, Path], None]:
    def mutate(record: dict, folder: Path) -> None:
        record["objects"][0][field] = value

    return mutate


def _duplicate_object_id(record: dict, folder: Path) -> None:
    record["objects"][1]["id"] = record["objects"][0]["id"]


def _caption_span_outside(record: dict, folder: Path) -> None:
    record["caption"] = "a man"
    for obj in record["objects"]:
        obj.pop("phrases")
        obj["span"] = [0, 5]
    record["objects"][0]["span"] = [2, 40]


def _caption_span_cuts_a_word(record: dict, folder: Path) -> None:
    record["caption"] = "a woman and a man"
    record["objects"] = record["objects"][:2]
    for obj, span in zip(record["objects"], ([2, 7], [15, 17]), strict=True):
        obj.pop("phrases")
        obj["span"] = span


def _broken_image(record: dict, folder: Path) -> None:
    data = (folder / record["image"]).read_bytes()
    (folder / "broken.jpg").write_bytes(data[: len(data) // 3])
    record["image"] = "broken.jpg"


def _rle_of_another_size(record: dict, folder: Path) -> None:
    record["objects"][0]["mask"] = encode_mask(np.ones((10, 10), dtype=bool))


def _empty_rle(record: dict, folder: Path) -> None:
    record["objects"][0]["mask"] = encode_mask(np.zeros((record["height"], record["width"]), dtype=bool))


def _duplicate_object(record: dict, folder: Path) -> None:
    twin = copy.deepcopy(record["objects"][0])
    twin["id"] = "twin"
    record["objects"].insert(1, twin)


# name -> (how the second record is spoiled, the field the message names, a piece of the message)
BAD_RECORDS = {
    "unknown field": (_set("imgae", "x.jpg"), "imgae", "unknown field"),
    "no objects": (_set("objects", []), "objects", "non-empty list"),
    "empty phrase": (_set_object("phrases", ["  "]), "objects[0].phrases[0]", "non-empty string"),
    "no phrases": (_set_object("phrases", []), "objects[0].phrases", "non-empty list of phrases"),
    "object ids not unique": (_duplicate_object_id, "objects[1].id", "also the id of objects[0]"),
    "span outside the caption": (_caption_span_outside, "objects[0].span", "[start, end)"),
    "span cutting a word": (_caption_span_cuts_a_word, "objects[1].span", "cuts a word: 'an'"),
    "malformed polygon": (_set_object("mask", [[1, 2, 3]]), "objects[0].mask[0]", "at least 3"),
    "RLE without size": (_set_object("mask", {"counts": "PP"}), "objects[0].mask.size", "size"),
    "bad box": (_set_object("box", [1, 2, 0, 4]), "objects[0].box", "width, height > 0"),
    "missing image": (_set("image", "nowhere.jpg"), "image", "missing file"),
    "unreadable image": (_broken_image, "image", "unreadable image"),
    "image of another size": (_set("width", 100), "image", "size mismatch"),
    "RLE of another size": (_rle_of_another_size, "objects[0].mask", "RLE of size 10x10"),
    "polygon outside the image": (
        _set_object("mask", [[600.0, 10.0, 700.0, 10.0, 650.0, 50.0]]),
        "objects[0].mask",
        "outside the 640x427",
    ),
    "empty mask": (_empty_rle, "objects[0].mask", "empty mask"),
    "box outside the image": (_set_object("box", [600.0, 0.0, 100.0, 10.0]), "objects[0].box", "outside"),
    "duplicate object": (_duplicate_object, "objects[1]", "duplicate of objects[0]"),
}


@pytest.fixture
def good_records(coco_sample: Path) -> list[dict]:
    records = sorted(
        convert_coco(coco_sample, coco_sample / "own.jsonl"), key=lambda record: record["height"]
    )
    # the second record is the photo the cases spoil: 640x427, more than one object
    assert records[1]["width"] == 640 and records[1]["height"] == 427 and len(records[1]["objects"]) > 1
    return records


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_each_bad_record_is_named_by_file_line_and_field(
    case: str, good_records: list[dict], coco_sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mutate, field, message = BAD_RECORDS[case]
    bad = copy.deepcopy(good_records[1])
    mutate(bad, coco_sample)
    path = write_jsonl(coco_sample / "bad.jsonl", [good_records[0], bad])

    assert check_cli.main([str(path)]) == 1
    printed = capsys.readouterr().out
    problems = [line for line in printed.splitlines() if line.startswith(f"{path}:")]
    assert problems and all(line.startswith(f"{path}:2: ") for line in problems), printed
    assert any(line.startswith(f"{path}:2: {field}: ") and message in line for line in problems), printed
    assert "1 good, 1 bad" in printed

    with pytest.raises(BadSampleError) as raised:
        CustomDataset(path)
    assert str(path) in str(raised.value) and f"{path}:2: {field}: " in str(raised.value)


def test_record_ids_are_unique_in_a_file(good_records: list[dict], coco_sample: Path, capsys) -> None:
    twin = copy.deepcopy(good_records[1])
    twin["id"] = good_records[0]["id"]
    path = write_jsonl(coco_sample / "bad.jsonl", [good_records[0], twin])
    assert check_cli.main([str(path)]) == 1
    assert f"{path}:2: id: {str(good_records[0]['id'])!r} is also the id of the record on line 1" in (
        capsys.readouterr().out
    )


def test_a_file_that_is_not_json_lines_is_named_with_its_line(good_records: list[dict], coco_sample: Path):
    path = coco_sample / "bad.jsonl"
    path.write_text(json.dumps(good_records[0]) + "\n{not json\n")
    with pytest.raises(FormatError, match=f"{path}:2: not valid JSON"):
        CustomDataset(path)


def test_a_deeply_nested_line_is_refused_naming_its_line(good_records: list[dict], coco_sample: Path):
    path = coco_sample / "deep.jsonl"
    path.write_text(json.dumps(good_records[0]) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(FormatError, match=f"{path}:2: refused: nested deeper"):
        CustomDataset(path)


def test_a_json_array_file_names_the_line_of_each_record(good_records: list[dict], coco_sample: Path):
    bad = copy.deepcopy(good_records[1])
    bad["objects"][0]["phrases"] = [""]
    path = coco_sample / "bad.json"
    path.write_text("[\n" + json.dumps(good_records[0]) + ",\n\n" + json.dumps(bad) + "\n]\n")
    with pytest.raises(BadSampleError, match=rf"{path}:4: objects\[0\]\.phrases\[0\]: "):
        CustomDataset(path)


def test_check_prints_a_summary_of_a_good_file(good_records: list[dict], coco_sample: Path, capsys) -> None:
    path = coco_sample / "own.jsonl"
    assert check_cli.main([str(path)]) == 0
    printed = capsys.readouterr().out
    objects = sum(len(record["objects"]) for record in good_records)
    assert f"objects                 {objects}" in printed
    assert "images of 640x427       1" in printed and "images of 640x360       1" in printed
    # the largest mask's share of its image, computed here from the annotation itself
    largest = max(
        100
        * mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(o["mask"], r["height"], r["width"])))
        / (r["width"] * r["height"])
        for r in good_records
        for o in r["objects"]
    )
    assert f"p100 {largest:.2f}" in printed
    assert "OK: every record is good" in printed


def test_skip_policy_leaves_out_exactly_the_bad_record(good_records: list[dict], coco_sample: Path) -> None:
    bad = copy.deepcopy(good_records[1])
    bad["objects"][0]["phrases"] = [""]
    path = write_jsonl(coco_sample / "mixed.jsonl", [good_records[0], bad, good_records[1]])
    dataset = CustomDataset(path, on_bad_sample="skip")
    items = [dataset[index] for index in range(len(dataset))]
    assert isinstance(items[0], GroundingSample) and isinstance(items[2], GroundingSample)
    assert isinstance(items[1], SkippedSample)
    assert items[1].sample_id == "line 2" and items[1].path == str(path)
    clean = CustomDataset(write_jsonl(coco_sample / "clean.jsonl", good_records))
    for kept, expected in zip([items[0], items[2]], [clean[0], clean[1]], strict=True):
        assert kept.phrases == expected.phrases and torch.equal(kept.masks, expected.masks)


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("split", ["train", "val", "testA", "testB"])
def test_refcoco_round_trip_gives_the_refcoco_loaders_samples(
    split: str, fixtures_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / f"refcoco_{split}.jsonl"
    root = fixtures_dir / "coco_sample"
    args = ["--data-root", str(root), "--dataset", "refcoco", "--split-by", "unc", "--split", split]
    assert convert_cli.main(["refcoco", *args, "--image-dir", "images", "--out", str(out)]) == 0
    for text_mode in ("first", "all", "random_once"):
        refs = RefCocoDataset(root, "refcoco", "unc", split, "images", text_mode=text_mode)
        own = CustomDataset(out, text_mode=text_mode)
        assert len(own) == len(refs) > 0
        for index in range(len(refs)):
            expected, actual = refs[index], own[index]
            assert actual.phrases == expected.phrases, text_mode
            assert actual.object_ids == expected.object_ids
            assert actual.image_id == expected.image_id
            assert actual.masks.dtype == torch.bool and torch.equal(actual.masks, expected.masks)
            assert actual.utterances == expected.utterances
        assert own.eval_kind == refs.eval_kind == "res"


def test_png_round_trip_keeps_phrases_masks_and_caption(fixtures_dir: Path, tmp_path: Path) -> None:
    root = fixtures_dir / "coco_sample"
    out = convert_png(root, tmp_path / "png.jsonl")
    narratives = PNGDataset(*png_paths(root).values())
    own = CustomDataset(out)
    assert own.eval_kind == narratives.eval_kind == "png"
    assert len(own) == len(narratives) > 0
    for index in range(len(narratives)):
        expected, actual = narratives[index], own[index]
        assert actual.narrative and actual.phrases == expected.phrases
        assert torch.equal(actual.masks, expected.masks)
        assert torch.equal(actual.is_thing, expected.is_thing) and torch.equal(
            actual.is_plural, expected.is_plural
        )
        assert "".join(text for text, _ in actual.utterances) == "".join(
            text for text, _ in expected.utterances
        )
        grounded = [(text, k) for text, k in actual.utterances if k != NOT_GROUNDED]
        assert grounded == [(text, k) for text, k in expected.utterances if k != NOT_GROUNDED]


# ---------------------------------------------------------------------------------------------- converters
def test_coco_converter_reads_caption_and_phrase_fields(coco_sample: Path, tmp_path: Path) -> None:
    instances = json.loads((coco_sample / "refcoco" / "instances.json").read_text())
    first, second = instances["annotations"][:2]
    first["caption"] = "the player in the air"
    second["phrase"] = ["a man", "the man on the left"]
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps(instances))
    convert_cli.main(
        [
            "coco",
            "--annotations",
            str(annotations),
            "--images",
            str(coco_sample / "images"),
            "--out",
            str(tmp_path / "o.jsonl"),
        ]
    )
    objects = {
        o["id"]: o
        for r in map(json.loads, (tmp_path / "o.jsonl").read_text().splitlines())
        for o in r["objects"]
    }
    assert objects[first["id"]]["phrases"] == ["the player in the air"]
    assert objects[second["id"]]["phrases"] == ["a man", "the man on the left"]
    names = {c["id"]: c["name"] for c in instances["categories"]}
    third = instances["annotations"][2]
    assert objects[third["id"]]["phrases"] == [names[third["category_id"]]]


def test_labelme_converter_groups_shapes_and_refuses_what_is_no_mask(coco_sample: Path) -> None:
    labelme = {
        "imagePath": "000000142238.jpg",
        "imageWidth": 640,
        "imageHeight": 427,
        "shapes": [
            {
                "label": "ball",
                "points": [[100, 100], [140, 100], [120, 130]],
                "shape_type": "polygon",
                "group_id": None,
            },
            {"label": "sign", "points": [[10, 20], [50, 60]], "shape_type": "rectangle", "group_id": 1},
            {"label": "sign", "points": [[300, 20], [340, 60]], "shape_type": "rectangle", "group_id": 1},
        ],
    }
    source = coco_sample / "images" / "photo.json"
    source.write_text(json.dumps(labelme))
    out = coco_sample / "labelme.jsonl"
    assert convert_cli.main(["labelme", str(coco_sample / "images"), "--out", str(out)]) == 0
    sample = CustomDataset(out)[0]
    assert sample.phrases == ["ball", "sign"]
    # the two 40x40 rectangles are one object; a rasterised outline is exact to within its border pixels
    area, border = int(sample.masks[1].sum()), 2 * 2 * (40 + 40 + 1)
    assert abs(area - 2 * 40 * 40) <= border
    assert sample.masks[1, 40, 30] and sample.masks[1, 40, 320] and not sample.masks[1, 40, 200]

    labelme["shapes"].append({"label": "whistle", "points": [[5, 5], [9, 9]], "shape_type": "circle"})
    source.write_text(json.dumps(labelme))
    with pytest.raises(ConversionError, match=r"photo\.json: shapes\[3\] \('whistle'\): shape_type 'circle'"):
        list(convert_cli.labelme_records([source], coco_sample))

    labelme["shapes"].pop()
    labelme["imagePath"] = None
    source.write_text(json.dumps(labelme))
    with pytest.raises(ConversionError, match=r"photo\.json: imagePath: missing"):
        list(convert_cli.labelme_records([source], coco_sample))


# ---------------------------------------------------------------------------------------------- end to end
def custom_overrides(train_file: Path, val_file: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "data=custom",
        f"data.custom.train={train_file}",
        f"data.custom.val={val_file}",
        "data.num_workers=0",
        "logger=csv",
        f"paths.output_dir={run_dir}",
        f"hydra.run.dir={run_dir}",
        "module.mask_head.base_channels=16",
        *extra,
    ]


pytestmark = pytest.mark.usefixtures("pinned_threads")


def test_a_bad_record_stops_training_before_it_starts(
    good_records: list[dict], coco_sample: Path, compose_config, tmp_path: Path
) -> None:
    bad = copy.deepcopy(good_records[1])
    bad["objects"][0]["mask"] = [[600.0, 10.0, 700.0, 10.0, 650.0, 50.0]]
    train_file = write_jsonl(coco_sample / "train.jsonl", [good_records[0], bad])
    run_dir = tmp_path / "run"
    cfg = compose_config(
        custom_overrides(train_file, coco_sample / "own.jsonl", run_dir, "trainer.max_steps=1")
    )
    with pytest.raises(
        ConfigError, match=rf"data\.train_sets\.custom_train: (.|\n)*{train_file}:2: objects\[0\]\.mask: "
    ):
        train(cfg)
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_own_photos_train_evaluate_predict_and_fine_tune(
    good_records: list[dict],
    coco_sample: Path,
    compose_config,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The converted fixture photos, one bad record among them under the skip policy: training skips exactly
    it and reports it; the checkpoint evaluates (RES figures; PNG figures for a file of narratives) and
    predicts; init_from fine-tunes from it."""
    narratives = convert_png(coco_sample, coco_sample / "narratives.jsonl")
    bad = copy.deepcopy(good_records[1])
    bad["objects"][0]["phrases"] = [""]
    train_file = write_jsonl(coco_sample / "train.jsonl", [good_records[0], bad, good_records[1]])
    val_file = coco_sample / "own.jsonl"
    run_dir = tmp_path / "run"
    overrides = custom_overrides(
        train_file,
        val_file,
        run_dir,
        "data.custom.on_bad_sample=skip",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=0",
        f"+data.test_sets.own_narratives={{_target_: {NARRATIVE_SET_TARGET}, path: {narratives}}}",
    )
    results = train(compose_config(overrides))
    printed = capsys.readouterr().out
    assert "skipped samples (on_bad_sample=skip)" in printed
    table = printed.split("skipped samples (on_bad_sample=skip)")[1]
    rows = [line.split() for line in table.splitlines() if line.startswith("train ")]
    assert rows == [["train", "malformed", "annotation", "1", str(train_file)]], table
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping bad sample")]
    assert skipped == [
        f"skipping bad sample: train: sample line 2: malformed annotation: objects[0].phrases[0]: "
        f"must be a non-empty string, got '' (file: {train_file})"
    ]
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert load_checkpoint(checkpoint)["global_step"] == 3  # three records, one of them skipped (zero loss)
    test = results["custom_test"]
    assert 0.0 <= test["cIoU"] <= 1.0 and 0.0 <= test["mIoU"] <= 1.0
    assert set(results["own_narratives"]) >= {"AR", "AR_things", "AR_stuff", "AR_singulars", "AR_plurals"}
    assert 0.0 <= results["own_narratives"]["AR"] <= 1.0
    assert json.loads((run_dir / "metrics.json").read_text())["custom_test"]["cIoU"] == pytest.approx(
        test["cIoU"]
    )

    eval_dir = tmp_path / "eval"
    evaluated = evaluate(
        compose_config(
            [f"ckpt={checkpoint}", f"paths.output_dir={eval_dir}", f"hydra.run.dir={eval_dir}"], "eval"
        )
    )
    assert evaluated["custom_test"]["cIoU"] == pytest.approx(test["cIoU"], abs=1e-6)
    assert evaluated["own_narratives"]["AR"] == pytest.approx(results["own_narratives"]["AR"], abs=1e-6)

    overlay, answer = predict(
        compose_config(
            [
                f"ckpt={checkpoint}",
                f"image={coco_sample / PHOTO}",
                "phrases=[person]",
                "device=cpu",
                f"paths.output_dir={tmp_path / 'predict'}",
            ],
            "predict",
        )
    )
    assert overlay.is_file() and json.loads(answer.read_text())["objects"][0]["phrase"] == "person"

    # Fine-tuning: the run folder's trained weights, not the optimizer state.
    finetune = compose_config(
        custom_overrides(
            train_file,
            val_file,
            tmp_path / "ft",
            f"init_from={run_dir}",
            "module.optimizer.lr=1.0e-5",
            "data.custom.on_bad_sample=skip",
            "trainer.max_steps=1",
            "test_after_fit=false",
        )
    )
    capsys.readouterr()
    train(finetune)
    assert f"fine-tuning from the weights of {checkpoint}" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "ft" / "checkpoints" / "last.ckpt")["global_step"] == 1
    torch.manual_seed(1)
    module = build_module(finetune)
    assert check_init_from(finetune.init_from, run_config(finetune), finetune.paths) == checkpoint
    initialize_from(module, checkpoint)
    trained = load_checkpoint(checkpoint)["state_dict"]
    loaded = {key: value for key, value in module.state_dict().items() if key in trained}
    assert loaded.keys() == trained.keys()
    for key, value in loaded.items():
        assert torch.equal(value, trained[key]), key

    other = compose_config(
        custom_overrides(
            train_file, val_file, tmp_path / "other", "model=tiny_llava", f"init_from={checkpoint}"
        )
    )
    with pytest.raises(CheckpointMismatchError, match=r"cannot fine-tune from .*model\.lmm\._target_"):
        train(other)
    assert not (tmp_path / "other" / "checkpoints").exists()


def test_data_custom_without_files_names_the_settings(compose_config, tmp_path: Path) -> None:
    cfg = compose_config(["data=custom", f"paths.output_dir={tmp_path}"])
    named = r"data\.train_sets\.custom_train: no file given: .*data\.custom\.train="
    with pytest.raises(ConfigError, match=named):
        build_datamodule(cfg.data, build_prompt_builder(cfg), cfg.sam.image_size)
