"""PNGDataset on the real panoptic fixture, checked against an independent decode of the panoptic PNGs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flmm_lightning.boundaries import NOT_GROUNDED, GroundingSample
from flmm_lightning.data import PNGDataset


def png_dataset(root: Path, **kwargs) -> PNGDataset:
    return PNGDataset(
        root / "annotations" / "png_sample.json",
        root / "annotations" / "panoptic_sample.json",
        root / "panoptic",
        root / "images",
        **kwargs,
    )


def test_masks_flags_and_utterances(fixtures_dir: Path) -> None:
    root = fixtures_dir / "coco_sample"
    narratives = json.loads((root / "annotations" / "png_sample.json").read_text())
    panoptic = json.loads((root / "annotations" / "panoptic_sample.json").read_text())
    isthing = {category["id"]: bool(category["isthing"]) for category in panoptic["categories"]}
    annotation_of = {str(annotation["image_id"]): annotation for annotation in panoptic["annotations"]}

    dataset = png_dataset(root)
    assert len(dataset) == len(narratives)
    for sample, narrative in zip(dataset, narratives, strict=True):
        assert isinstance(sample, GroundingSample)
        annotation = annotation_of[narrative["image_id"]]
        rgb = np.asarray(
            Image.open(root / "panoptic" / annotation["file_name"]).convert("RGB"), dtype=np.uint32
        )
        ids = rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)
        category_of = {info["id"]: info["category_id"] for info in annotation["segments_info"]}
        grounded = [segment for segment in narrative["segments"] if segment["segment_ids"]]

        assert sample.image_id == int(narrative["image_id"])
        assert sample.image.mode == "RGB" and sample.image.size == (ids.shape[1], ids.shape[0])
        assert sample.masks.dtype == torch.bool and sample.masks.shape == (len(grounded), *ids.shape)
        assert sample.phrases == [segment["utterance"] for segment in grounded]
        assert sample.object_ids == ["+".join(segment["segment_ids"]) for segment in grounded]
        for k, segment in enumerate(grounded):
            union = np.zeros(ids.shape, dtype=bool)
            for segment_id in segment["segment_ids"]:
                union |= ids == int(segment_id)
            assert union.any()
            assert np.array_equal(sample.masks[k].numpy(), union)
            first_category = category_of[int(segment["segment_ids"][0])]
            assert bool(sample.is_plural[k]) == segment["plural"]
            assert bool(sample.is_thing[k]) == (segment["plural"] or isthing[first_category])

        assert "".join(text for text, _ in sample.utterances) == narrative["caption"]
        objects = iter(range(len(grounded)))
        expected = [
            (s["utterance"], next(objects) if s["segment_ids"] else NOT_GROUNDED)
            for s in narrative["segments"]
        ]
        assert sample.utterances == expected

    # The fixture covers stuff singulars ("the sky"), thing singulars ("a ball") and plurals ("people").
    flags = {(bool(t), bool(p)) for s in dataset for t, p in zip(s.is_thing, s.is_plural, strict=True)}
    assert flags == {(True, False), (False, False), (True, True)}


def test_ungrounded_narratives_are_dropped_and_logged_once(coco_sample: Path, caplog) -> None:
    path = coco_sample / "annotations" / "png_sample.json"
    narratives = json.loads(path.read_text())
    for source in list(narratives):
        ungrounded = [{**segment, "segment_ids": [], "plural": False} for segment in source["segments"]]
        narratives.append({**source, "segments": ungrounded})
    path.write_text(json.dumps(narratives))

    with caplog.at_level(logging.WARNING, logger="flmm_lightning.data.png"):
        dataset = png_dataset(coco_sample)
    assert len(dataset) == 2
    assert dataset.num_ungrounded_dropped == 2
    records = [record for record in caplog.records if record.name == "flmm_lightning.data.png"]
    assert len(records) == 1 and "dropped 2 of 4" in records[0].getMessage()
    # What is left are the two real narratives, never substitutes.
    assert [sample.image_id for sample in dataset] == [142238, 439180]
