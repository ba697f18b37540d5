"""RefCocoDataset on real refer-API fixtures, checked against an independent pycocotools decode."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from flmm_lightning.boundaries import NOT_GROUNDED, GroundingSample
from flmm_lightning.data import RefCocoDataset, load_refs


def trusted_refs(path: Path) -> list[dict]:
    # The fixtures are trusted: the test reads them with plain pickle, independently of load_refs.
    with path.open("rb") as file:
        return pickle.load(file)


def expected_by_ref(data_dir: Path, refs_name: str) -> dict[int, tuple[str, np.ndarray, dict]]:
    """ref_id -> (first sentence lower-cased as mmdet does it, mask by COCO.annToMask, ref)."""
    coco = COCO(str(data_dir / "instances.json"))
    return {
        ref["ref_id"]: (
            ref["sentences"][0]["raw"].lower(),
            coco.annToMask(coco.anns[ref["ann_id"]]),
            ref,
        )
        for ref in trusted_refs(data_dir / refs_name)
    }


def check_against_expected(
    sample: GroundingSample, expected: dict[int, tuple[str, np.ndarray, dict]]
) -> None:
    assert isinstance(sample, GroundingSample)
    assert sample.image.mode == "RGB"
    n = sample.num_objects
    assert sample.masks.dtype == torch.bool
    assert sample.masks.shape == (n, sample.image.height, sample.image.width)
    assert sample.is_thing.tolist() == [True] * n
    assert sample.is_plural.tolist() == [False] * n
    for k, object_id in enumerate(sample.object_ids):
        phrase, mask, ref = expected[int(object_id)]
        assert sample.phrases[k] == phrase
        assert np.array_equal(sample.masks[k].numpy(), mask.astype(bool))
        assert sample.image_id == ref["image_id"]
    pieces = [
        piece for k, phrase in enumerate(sample.phrases) for piece in ((phrase, k), (".", NOT_GROUNDED))
    ]
    assert sample.utterances == pieces


@pytest.mark.parametrize("group_by_image", [True, False])
@pytest.mark.parametrize("split", ["train", "val", "testA", "testB"])
def test_coco_sample_every_split(fixtures_dir: Path, split: str, group_by_image: bool) -> None:
    root = fixtures_dir / "coco_sample"
    expected = expected_by_ref(root / "refcoco", "refs(unc).p")
    split_refs = [ref for _, _, ref in expected.values() if ref["split"] == split]
    dataset = RefCocoDataset(root, "refcoco", "unc", split, "images", group_by_image=group_by_image)

    samples = list(dataset)
    for sample in samples:
        check_against_expected(sample, expected)
    # Every ref of the split exactly once, in the refs file's order.
    assert [int(i) for sample in samples for i in sample.object_ids] == [ref["ref_id"] for ref in split_refs]
    if group_by_image:
        assert len(samples) == len({ref["image_id"] for ref in split_refs})
        assert len({sample.image_id for sample in samples}) == len(samples)
    else:
        assert all(sample.num_objects == 1 for sample in samples)


TWO_SENTENCES = ["player on the far left", "leftmost rugby player"]  # ref 1, the only val ref on its image


def ref1_choices(root: Path, text_mode: str, seed: int, epochs: range) -> list[str]:
    """The sentence a freshly built dataset (a new worker, a resumed run) gives ref 1 in each epoch."""
    dataset = RefCocoDataset(
        root, "refcoco", "unc", "val", "images", text_mode=text_mode, group_by_image=False, seed=seed
    )
    index = next(i for i, s in enumerate(dataset) if s.object_ids[0] == "1")
    picked = []
    for epoch in epochs:
        dataset.set_epoch(epoch)
        assert dataset[index].phrases == dataset[index].phrases  # a re-read within the epoch repeats it
        picked.append(dataset[index].phrases[0])
    return picked


def test_text_mode_all_and_first(fixtures_dir: Path) -> None:
    root = fixtures_dir / "coco_sample"
    every = RefCocoDataset(root, "refcoco", "unc", "val", "images", text_mode="all", group_by_image=False)
    sample = next(s for s in every if s.object_ids[0] == "1")
    assert sample.phrases == TWO_SENTENCES
    assert sample.object_ids == ["1", "1"]
    assert torch.equal(sample.masks[0], sample.masks[1])
    assert ref1_choices(root, "first", seed=3, epochs=range(4)) == [TWO_SENTENCES[0]] * 4

    with pytest.raises(ValueError, match="group_by_image"):
        RefCocoDataset(root, "refcoco", "unc", "val", "images", text_mode="concat")


def test_random_once_draws_one_sentence_for_every_epoch(fixtures_dir: Path) -> None:
    """mmdet's RefCocoDataset draws each ref's sentence once, when the dataset is built."""
    root = fixtures_dir / "coco_sample"
    per_seed = [ref1_choices(root, "random_once", seed, range(6)) for seed in range(16)]
    for choices in per_seed:
        assert len(set(choices)) == 1  # the same sentence in every epoch
    assert {choices[0] for choices in per_seed} == set(TWO_SENTENCES)  # a draw, seeded
    # A dataset built again (a dataloader worker, a resumed run) starting at a later epoch draws the same.
    assert [ref1_choices(root, "random_once", seed, range(4, 6)) for seed in range(16)] == [
        choices[4:] for choices in per_seed
    ]


def test_random_per_epoch_draws_again_every_epoch(fixtures_dir: Path) -> None:
    root = fixtures_dir / "coco_sample"
    first = ref1_choices(root, "random_per_epoch", seed=0, epochs=range(16))
    assert set(first) == set(TWO_SENTENCES)
    assert ref1_choices(root, "random_per_epoch", seed=0, epochs=range(16)) == first
    assert ref1_choices(root, "random_per_epoch", seed=0, epochs=range(9, 16)) == first[9:]  # resumed
    assert ref1_choices(root, "random_per_epoch", seed=1, epochs=range(16)) != first


def test_earlier_text_mode_names_keep_their_behaviour(fixtures_dir: Path) -> None:
    root = fixtures_dir / "coco_sample"
    epochs = range(8)
    assert ref1_choices(root, "select_first", 0, epochs) == ref1_choices(root, "first", 0, epochs)
    assert ref1_choices(root, "random", 2, epochs) == ref1_choices(root, "random_per_epoch", 2, epochs)
    with pytest.raises(ValueError, match="random_once"):
        RefCocoDataset(root, "refcoco", "unc", "val", "images", text_mode="once")


def test_sentences_are_lower_cased_and_keep_whitespace_as_in_mmdet(coco_sample: Path) -> None:
    refs_path = coco_sample / "refcoco" / "refs(unc).p"
    refs = trusted_refs(refs_path)
    ref = next(r for r in refs if r["ref_id"] == 1)
    ref["sentences"][0]["raw"] = "Player on the Far Left "
    with refs_path.open("wb") as file:
        pickle.dump(refs, file)

    def first_phrase(**kwargs: object) -> str:
        dataset = RefCocoDataset(
            coco_sample, "refcoco", "unc", "val", "images", group_by_image=False, **kwargs
        )
        return next(s for s in dataset if s.object_ids[0] == "1").phrases[0]

    # the reference tokenises the trailing space too (Qwen2: token " ") and averages it into the phrase
    assert first_phrase() == "player on the far left "
    assert first_phrase(strip_sentences=True) == "player on the far left"


def test_unknown_split_lists_valid_splits(fixtures_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p.*'test'.*testA.*testB.*train.*val"):
        RefCocoDataset(fixtures_dir / "coco_sample", "refcoco", "unc", "test", "images")


@pytest.mark.parametrize("group_by_image", [False, True])
def test_refcocog_umd_all_refs(fixtures_dir: Path, tmp_path: Path, group_by_image: bool) -> None:
    source = fixtures_dir / "refcocog_umd_annotations"
    data_dir = tmp_path / "refcocog"
    data_dir.mkdir()
    for name in ("instances.json", "refs(umd).p"):
        (data_dir / name).write_bytes((source / name).read_bytes())
    images = json.loads((source / "instances.json").read_text())["images"]
    (tmp_path / "train2014").mkdir()
    for image in images:
        Image.new("RGB", (image["width"], image["height"])).save(tmp_path / "train2014" / image["file_name"])

    expected = expected_by_ref(data_dir, "refs(umd).p")
    seen = []
    for split in ("train", "val", "test"):
        dataset = RefCocoDataset(
            tmp_path, "refcocog", "umd", split, "train2014", group_by_image=group_by_image
        )
        for sample in dataset:
            check_against_expected(sample, expected)
            seen += [int(i) for i in sample.object_ids]
    assert sorted(seen) == sorted(expected) and len(seen) == 15


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Run lengths in column-major order, starting with a run of zeros (COCO's uncompressed RLE)."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def test_rle_segmentations(coco_sample: Path) -> None:
    """Uncompressed and compressed RLE decode to the same masks as the original polygons."""
    instances_path = coco_sample / "refcoco" / "instances.json"
    coco = COCO(str(instances_path))
    instances = json.loads(instances_path.read_text())
    masks = {}
    for k, annotation in enumerate(instances["annotations"]):
        mask = coco.annToMask(coco.anns[annotation["id"]])
        masks[annotation["id"]] = mask
        if k % 2 == 0:
            annotation["segmentation"] = uncompressed_rle(mask)
        else:
            rle = mask_utils.encode(np.asfortranarray(mask))
            annotation["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    instances_path.write_text(json.dumps(instances))
    ann_of_ref = {
        ref["ref_id"]: ref["ann_id"] for ref in trusted_refs(coco_sample / "refcoco" / "refs(unc).p")
    }

    for split in ("train", "val", "testA", "testB"):
        for sample in RefCocoDataset(coco_sample, "refcoco", "unc", split, "images"):
            for k, ref_id in enumerate(sample.object_ids):
                assert np.array_equal(sample.masks[k].numpy(), masks[ann_of_ref[int(ref_id)]].astype(bool))


def py2_str(text: bytes) -> bytes:
    return b"U" + bytes([len(text)]) + text  # SHORT_BINSTRING: Python 2's pickle of a str


def py2_int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)  # BININT


def test_python2_protocol2_pickle_loads_as_str(tmp_path: Path) -> None:
    sentence = b"}" + b"(" + py2_str(b"raw") + py2_str("Caf\u00e9 player".encode()) + py2_str(b"sent_id")
    sentence += py2_int(7) + b"u"
    ref = b"}" + b"(" + py2_str(b"ref_id") + py2_int(1) + py2_str(b"split") + py2_str(b"val")
    ref += py2_str(b"latin") + py2_str(b"na\xefve") + py2_str(b"sentences") + b"]" + sentence + b"a" + b"u"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(b"\x80\x02" + b"]" + ref + b"a" + b".")

    refs = load_refs(path)
    assert refs == [
        {
            "ref_id": 1,
            "split": "val",
            "latin": "na\u00efve",
            "sentences": [{"raw": "Caf\u00e9 player", "sent_id": 7}],
        }
    ]
    assert all(isinstance(key, str) for key in refs[0])
