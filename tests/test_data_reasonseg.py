"""ReasonSegDataset on hand-written files in the released layout; the reasoning prompt protocol."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from flmm_lightning.assets.synthetic_data import COLOUR_THINGS, COLOURS
from flmm_lightning.boundaries import GroundingSample, SkippedSample
from flmm_lightning.data import (
    BadSampleError,
    BadSampleReason,
    ReasonSegDataset,
    RefCocoDataset,
    SyntheticPaths,
    reasoning_prompt,
    write_synthetic_dataset,
)
from flmm_lightning.data.batch import GroundingBatch, SampleBatch
from flmm_lightning.data.datamodule import GroundingDataModule
from flmm_lightning.data.reasonseg import ANSWER_PREFIX, is_sentence_query, polygon_mask
from flmm_lightning.runs.build import build_datamodule, build_prompt_builder

WIDTH, HEIGHT = 12, 8


def rectangle(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def shape(label: str, points: list[list[float]]) -> dict[str, Any]:
    return {"label": label, "points": points, "group_id": None, "shape_type": "polygon", "flags": {}}


def write_sample(split_dir: Path, stem: str, document: Any, size: tuple[int, int] = (WIDTH, HEIGHT)) -> None:
    split_dir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 60, 30)).save(split_dir / f"{stem}.jpg", quality=95)
    text = document if isinstance(document, str) else json.dumps(document)
    (split_dir / f"{stem}.json").write_text(text)


def box(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """bool [HEIGHT, WIDTH]: columns x0..x1 and rows y0..y1, inclusive."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


@pytest.fixture
def split_dir(tmp_path: Path) -> Path:
    """Three images: two queries with a target and an ignore region; a plain-string sentence query with two
    target polygons and a deprecated "flag" shape; nested shapes where the smaller one decides."""
    root = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    write_sample(
        root,
        "a_two_queries",
        {
            "text": ["the thing to sit on", "  the seat  "],
            "is_sentence": False,
            "shapes": [shape("target", rectangle(1, 1, 4, 3)), shape("ignore", rectangle(6, 0, 7, 7))],
        },
    )
    write_sample(
        root,
        "b_sentence",
        {
            "text": "What would you use to cut the bread?",
            "is_sentence": True,
            "shapes": [
                shape("target", rectangle(0, 0, 1, 1)),
                shape("Target", rectangle(9.7, 5.2, 11.9, 7.6)),  # truncated to columns 9..11, rows 5..7
                shape("flag", rectangle(0, 0, 11, 7)),
            ],
        },
    )
    write_sample(
        root,
        "c_nested",
        {
            "text": ["the tray without the cup on it"],
            "is_sentence": False,
            "shapes": [
                shape("ignore", rectangle(4, 2, 5, 3)),  # small: wins over the target around it
                shape("target", rectangle(2, 0, 9, 5)),
                shape("target", rectangle(0, 6, 11, 7)),  # inside the large ignore below: target wins
                shape("ignore_region", rectangle(0, 5, 11, 7)),
            ],
        },
    )
    return root


def test_items_masks_and_flags(split_dir: Path) -> None:
    first = ReasonSegDataset(split_dir)
    every = ReasonSegDataset(split_dir, query_mode="all")
    assert len(first) == 3 and len(every) == 4
    samples = list(every)
    assert all(isinstance(sample, GroundingSample) for sample in samples)
    assert [s.phrases for s in samples] == [
        ["the thing to sit on"],
        ["the seat"],
        ["What would you use to cut the bread?"],
        ["the tray without the cup on it"],
    ]
    assert [s.object_ids for s in samples] == [["a_two_queries#0"], ["a_two_queries#1"], ["b_sentence#0"]] + [
        ["c_nested#0"]
    ]
    assert [s.is_sentence.tolist() for s in samples] == [[False], [False], [True], [False]]
    for sample in samples:
        assert sample.image.size == (WIDTH, HEIGHT) and sample.file_name == f"{sample.image_id}.jpg"
        assert sample.masks.dtype == sample.ignore_masks.dtype == torch.bool
        assert sample.masks.shape == sample.ignore_masks.shape == (1, HEIGHT, WIDTH)
        assert not (sample.masks & sample.ignore_masks).any()

    small_ignore, bottom_ignore = box(4, 2, 5, 3), box(0, 5, 11, 5)
    expected = {
        "a_two_queries": (box(1, 1, 4, 3), box(6, 0, 7, 7)),
        "b_sentence": (box(0, 0, 1, 1) | box(9, 5, 11, 7), np.zeros((HEIGHT, WIDTH), bool)),
        "c_nested": (
            (box(2, 0, 9, 5) & ~small_ignore & ~bottom_ignore) | box(0, 6, 11, 7),
            small_ignore | bottom_ignore,
        ),
    }
    for sample in samples:
        target, ignore = expected[sample.image_id]
        np.testing.assert_array_equal(sample.masks[0].numpy(), target)
        np.testing.assert_array_equal(sample.ignore_masks[0].numpy(), ignore)
    # select_first: the first query of each image, the same masks.
    assert [s.object_ids for s in first] == [["a_two_queries#0"], ["b_sentence#0"], ["c_nested#0"]]


def test_polygon_pixel_convention() -> None:
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    # Vertices name pixel centres; the outline belongs to the polygon (the hypotenuse x + y = 4 included).
    np.testing.assert_array_equal(polygon_mask([(0, 0), (4, 0), (0, 4)], WIDTH, HEIGHT), xx + yy <= 4)
    # Fractional coordinates are truncated toward zero; parts outside the image are clipped.
    np.testing.assert_array_equal(
        polygon_mask([(-0.9, 2.7), (20.5, 2.2), (20.5, 30.0), (-0.9, 30.0)], WIDTH, HEIGHT), yy >= 2
    )
    assert not polygon_mask([(-9, -9), (-5, -9), (-5, -5)], WIDTH, HEIGHT).any()


def test_windows_1252_annotation(tmp_path: Path) -> None:
    document = {
        "text": ["the café sign"],
        "is_sentence": False,
        "shapes": [shape("target", rectangle(1, 1, 3, 3))],
    }
    write_sample(tmp_path, "x", document)
    (tmp_path / "x.json").write_bytes(json.dumps(document, ensure_ascii=False).encode("cp1252"))
    assert ReasonSegDataset(tmp_path)[0].phrases == ["the café sign"]


def check_policies(split_dir: Path, reason: BadSampleReason, path: Path, sample_id: str, detail: str) -> None:
    """raise: the error names the file, the sample and what is wrong; skip: one marker, the good item kept."""
    with pytest.raises(BadSampleError) as info:
        dataset = ReasonSegDataset(split_dir)
        for index in range(len(dataset)):
            dataset[index]
    error = info.value
    assert (error.reason, error.path, error.sample_id) == (reason, str(path), sample_id)
    assert str(path) in str(error) and detail in str(error)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = list(ReasonSegDataset(split_dir, on_bad_sample="skip"))
    assert [item for item in items if isinstance(item, SkippedSample)] == [
        SkippedSample("reasonseg/val", sample_id, str(path), str(reason))
    ]
    assert sum(isinstance(item, GroundingSample) for item in items) == 1


GOOD = {"text": ["the cup"], "is_sentence": False, "shapes": [shape("target", rectangle(1, 1, 3, 3))]}
MALFORMED: list[tuple[Any, str]] = [
    ('{"text": ["the cup"], "is_sentence": fals', "Expecting value"),
    ("[" * 100_000 + "]" * 100_000, "maximum recursion depth exceeded"),
    ([GOOD], "expected a JSON object, found a list"),
    ({"text": ["the cup"], "shapes": []}, "missing keys ['is_sentence']"),
    ({**GOOD, "text": []}, "'text' must be"),
    ({**GOOD, "text": ["the cup", " "]}, "'text' must be"),
    ({**GOOD, "is_sentence": "yes"}, "'is_sentence' must be true or false"),
    ({**GOOD, "shapes": [shape("target", [[1, 1], [3, 1]])]}, "shapes[0]: 'points' must be"),
    ({**GOOD, "shapes": [shape("target", [[1, 1], [3, 1], [3, float("nan")]])]}, "shapes[0]: a point"),
    ({**GOOD, "shapes": [shape("target", [[1, 1], [3, 1], [3, 2**40]])]}, "shapes[0]: a point"),
    ({**GOOD, "shapes": [{**shape("target", rectangle(1, 1, 3, 3)), "shape_type": "circle"}]}, "'circle'"),
    ({**GOOD, "shapes": [{"points": rectangle(1, 1, 3, 3)}]}, "shapes[0]: expected an object with"),
]


@pytest.mark.parametrize(("document", "detail"), MALFORMED)
def test_malformed_annotation(tmp_path: Path, document: Any, detail: str) -> None:
    split_dir = tmp_path / "val"
    write_sample(split_dir, "good", GOOD)
    write_sample(split_dir, "bad", document)
    reason = BadSampleReason.MALFORMED_ANNOTATION
    check_policies(split_dir, reason, split_dir / "bad.json", "name=bad", detail)


@pytest.mark.parametrize(
    ("shapes", "reason", "detail"),
    [
        ([shape("ignore", rectangle(1, 1, 3, 3))], BadSampleReason.MISSING_SEGMENT, "no target shape"),
        ([], BadSampleReason.MISSING_SEGMENT, "no target shape"),
        (
            [shape("target", rectangle(1, 1, 3, 3)), shape("target", rectangle(20, 1, 30, 5))],
            BadSampleReason.EMPTY_MASK,
            "shapes[1] lies entirely outside the 12x8 (WxH) image",
        ),
        (
            # Equal areas: the shape listed first is painted last.
            [shape("ignore", rectangle(1, 1, 2, 2)), shape("target", rectangle(1, 1, 2, 2))],
            BadSampleReason.EMPTY_MASK,
            "covered by ignore shapes",
        ),
    ],
)
def test_no_usable_target(tmp_path: Path, shapes: list, reason: BadSampleReason, detail: str) -> None:
    split_dir = tmp_path / "val"
    write_sample(split_dir, "good", GOOD)
    write_sample(split_dir, "bad", {**GOOD, "shapes": shapes})
    # Found when the JSON is indexed (no target label) or when the shapes meet the image's size.
    sample_id = "name=bad" if reason == BadSampleReason.MISSING_SEGMENT else "name=bad, query=0"
    check_policies(split_dir, reason, split_dir / "bad.json", sample_id, detail)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    split_dir = tmp_path / "val"
    write_sample(split_dir, "good", GOOD)
    write_sample(split_dir, "bad", GOOD)
    image = split_dir / "bad.jpg"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    sample_id = "name=bad, query=0"
    check_policies(split_dir, BadSampleReason.UNREADABLE_IMAGE, image, sample_id, "")
    image.unlink()
    check_policies(split_dir, BadSampleReason.MISSING_FILE, image, sample_id, "file not found")
    write_sample(split_dir, "bad", GOOD)
    (split_dir / "bad.json").unlink()
    check_policies(split_dir, BadSampleReason.MISSING_FILE, split_dir / "bad.json", "name=bad", "annotation")


def test_max_queries_keeps_the_first_items(split_dir: Path) -> None:
    every = ReasonSegDataset(split_dir, query_mode="all")
    first_two = ReasonSegDataset(split_dir, query_mode="all", max_queries=2)
    assert [s.object_ids for s in first_two] == [every[0].object_ids, every[1].object_ids]
    assert len(ReasonSegDataset(split_dir, max_queries=10)) == len(ReasonSegDataset(split_dir))
    with pytest.raises(ValueError, match="max_queries must be at least 1"):
        ReasonSegDataset(split_dir, max_queries=0)


def test_a_query_without_its_flag_is_a_sentence_when_it_ends_like_one() -> None:
    assert [is_sentence_query(q) for q in ("What is it?", "Cut it.", "Go! ", "the seat", " ")] == [
        True,
        True,
        True,
        False,
        False,
    ]


def test_split_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ReasonSeg split folder not found: .*nowhere"):
        ReasonSegDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no <name>.jpg / <name>.json pairs"):
        ReasonSegDataset(tmp_path)
    with pytest.raises(ValueError, match="query_mode must be one of"):
        ReasonSegDataset(tmp_path, query_mode="random")


def test_reasoning_prompt() -> None:
    assert (
        reasoning_prompt(" the round shape ", is_sentence=False) == "What is the round shape in this image?"
    )
    sentence = "Which shape has no corners at all?"
    assert reasoning_prompt(sentence, is_sentence=True) == sentence
    custom = reasoning_prompt("x", is_sentence=False, short_template="Find {query}. Be brief.")
    assert custom == "Find x. Be brief."
    with pytest.raises(ValueError, match="exactly once"):
        reasoning_prompt("x", is_sentence=True, sentence_template="no placeholder")
    assert ANSWER_PREFIX == "It is"


def test_split_kind_and_context_cut_keep_reasonseg_fields(split_dir: Path, tiny_config) -> None:
    prompt_builder = build_prompt_builder(tiny_config)
    datamodule = GroundingDataModule(
        prompt_builder, 64, val_sets={"reasonseg_val": ReasonSegDataset(split_dir)}
    )
    assert datamodule.split_kind("reasonseg_val") == "reasonseg"

    one = ReasonSegDataset(split_dir)[0]
    ignore = torch.zeros(3, *one.masks.shape[1:], dtype=torch.bool)
    ignore[1, 0, 0] = True
    long_query = one.phrases[0] + " and more" * 1300
    sample = GroundingSample(
        image=one.image,
        phrases=[one.phrases[0], long_query, long_query],
        masks=one.masks.expand(3, -1, -1).clone(),
        is_thing=torch.ones(3, dtype=torch.bool),
        is_plural=torch.zeros(3, dtype=torch.bool),
        image_id=one.image_id,
        file_name=one.file_name,
        object_ids=["0", "1", "2"],
        ignore_masks=ignore,
        is_sentence=torch.tensor([False, True, False]),
    )
    with pytest.warns(UserWarning, match="its last 1 of 3 objects are dropped"):
        fitted = prompt_builder.fit_to_context(sample)
    assert torch.equal(fitted.ignore_masks, ignore[:2]) and fitted.is_sentence.tolist() == [False, True]


def test_a_reasoning_split_is_loaded_unencoded(synthetic_data: SyntheticPaths, tiny_config) -> None:
    """A reasoning split's loader gives the dataset's samples as they are (the inference pipeline encodes
    each query with the LMM's answer); a referring split's loader encodes its samples for the model, and
    only it is walked by the feature-cache pre-pass."""
    prompt_builder = build_prompt_builder(tiny_config)
    reasoning = ReasonSegDataset(**synthetic_data.reasonseg_kwargs("val"), query_mode="all")
    referring = RefCocoDataset(**synthetic_data.refcoco_kwargs("val"), text_mode="first")
    datamodule = GroundingDataModule(
        prompt_builder,
        tiny_config.sam.image_size,
        test_sets={"refcoco_val": referring, "reasonseg_val": reasoning},
        eval_batch_size=4,
        num_workers=0,
    )
    assert [datamodule.is_reasoning(name) for name in datamodule.test_names] == [False, True]
    referring_loader, reasoning_loader = datamodule.test_dataloader()

    batches = list(reasoning_loader)
    assert all(isinstance(batch, SampleBatch) and not batch.skipped for batch in batches)
    loaded = [sample for batch in batches for sample in batch.samples]
    assert [(s.image_id, s.phrases) for s in loaded] == [
        (reasoning[i].image_id, reasoning[i].phrases) for i in range(len(reasoning))
    ]
    assert all(torch.equal(s.masks, reasoning[i].masks) for i, s in enumerate(loaded))

    batch = next(iter(referring_loader))
    assert isinstance(batch, GroundingBatch) and batch.lmm is not None
    assert len(batch.sam_images) == len(batch.samples) == 4

    assert list(datamodule.encoded_sets()) == ["refcoco_val"]
    only = datamodule.with_test_sets(["reasonseg_val"])
    assert only.test_names == ["reasonseg_val"] and datamodule.test_names == ["refcoco_val", "reasonseg_val"]


# The property words of the synthetic queries, per kind (the colour ones come from COLOUR_THINGS).
KIND_WORDS = {"circle": ("round", "no corners", "wheel"), "square": ("four",), "triangle": ("three",)}


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def test_synthetic_reasonseg_reads_back(synthetic_data: SyntheticPaths) -> None:
    """Each query names one shape through a property; its mask is that shape (the RefCOCO phrase of the
    best-matching shape carries the colour and the kind the property implies); the ignore region is
    another shape."""
    seen = {"sentence": set(), "ignore": 0, "several": 0, "kind": 0, "colour": 0}
    for split in ("train", "val"):
        every = ReasonSegDataset(**synthetic_data.reasonseg_kwargs(split), query_mode="all")
        refs = {sample.file_name: sample for sample in RefCocoDataset(**synthetic_data.refcoco_kwargs(split))}
        assert len(ReasonSegDataset(**synthetic_data.reasonseg_kwargs(split))) == len(refs)
        seen["several"] += len(every) - len(refs)
        for sample in every:
            assert isinstance(sample, GroundingSample)
            ref = refs[sample.file_name]
            assert np.array_equal(np.asarray(sample.image), np.asarray(ref.image))
            query, target = sample.phrases[0], sample.masks[0]
            assert not set(re.findall(r"[a-z]+", query.lower())) & set(COLOURS)  # no colour named
            ious = [mask_iou(target, mask) for mask in ref.masks]
            best = int(np.argmax(ious))
            assert ious[best] > 0.8
            colour = (
                next(name for name, thing in COLOUR_THINGS.items() if thing in query)
                if "colour" in query
                else None
            )
            if colour is not None:
                assert colour in ref.phrases[best].split()
                seen["colour"] += 1
            else:
                kind = next(k for k, words in KIND_WORDS.items() if any(w in query for w in words))
                assert kind in ref.phrases[best].split()
                seen["kind"] += 1
            seen["sentence"].add(bool(sample.is_sentence[0]))
            assert query.endswith("?") == bool(sample.is_sentence[0])
            ignore = sample.ignore_masks[0]
            if ignore.any():
                seen["ignore"] += 1
                assert max(mask_iou(ignore, mask) for k, mask in enumerate(ref.masks) if k != best) > 0.8
    assert seen["sentence"] == {False, True}
    assert min(seen["ignore"], seen["several"], seen["kind"], seen["colour"]) > 0


def test_data_configs(split_dir: Path, compose_config, tmp_path: Path) -> None:
    """data=reasonseg reads the released layout under paths.data_dir; data=synthetic_reasonseg the demo's."""
    data_dir = split_dir.parents[2]
    assert split_dir == data_dir / "reason_seg" / "ReasonSeg" / "val"
    shutil.copytree(split_dir, split_dir.parent / "test")
    common = ["model=tiny_qwen2_5_vl", "sam=tiny", f"paths.output_dir={tmp_path}", "data.num_workers=0"]
    cfg = compose_config([*common, "data=reasonseg", f"paths.data_dir={data_dir}"])
    prompt_builder = build_prompt_builder(cfg)
    datamodule = build_datamodule(cfg.data, prompt_builder, cfg.sam.image_size)
    assert datamodule.val_names == ["reasonseg_val"]
    assert datamodule.test_names == ["reasonseg_val", "reasonseg_test"]
    assert [len(datamodule.test_sets[name]) for name in datamodule.test_names] == [3, 3]
    assert {datamodule.split_kind(name) for name in datamodule.test_names} == {"reasonseg"}

    overrides = ["data=synthetic_reasonseg", f"paths.data_dir={tmp_path}", "data.synthetic.num_val=3"]
    cfg = compose_config([*common, *overrides, "data.synthetic.num_train=2"])
    datamodule = build_datamodule(cfg.data, prompt_builder, cfg.sam.image_size)
    assert datamodule.test_names == ["synthetic_reasonseg_val"]
    assert datamodule.split_kind("synthetic_reasonseg_val") == "reasonseg"
    val = datamodule.test_sets["synthetic_reasonseg_val"]
    assert len(val) >= 3 and all(isinstance(sample, GroundingSample) for sample in val)


def test_synthetic_rebuild_leaves_no_stale_reasonseg_files(tmp_path: Path) -> None:
    paths = write_synthetic_dataset(tmp_path, num_train=3, num_val=1)
    assert len(list(paths.reasonseg_dir["train"].glob("*.json"))) == 3
    write_synthetic_dataset(tmp_path, num_train=1, num_val=1)
    assert sorted(path.name for path in paths.reasonseg_dir["train"].iterdir()) == [
        "synthetic_000001.jpg",
        "synthetic_000001.json",
    ]
