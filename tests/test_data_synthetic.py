"""The synthetic dataset: real formats read back by the real loaders, learnable, deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flmm_lightning.assets.synthetic_data import COLOURS, SHAPE_KINDS
from flmm_lightning.boundaries import GroundingSample
from flmm_lightning.data import PNGDataset, RefCocoDataset, SyntheticPaths, write_synthetic_dataset


def mean_colour(sample: GroundingSample, k: int) -> np.ndarray:
    return np.asarray(sample.image, dtype=np.float64)[sample.masks[k].numpy()].mean(axis=0)


@pytest.mark.parametrize("split", ["train", "val"])
def test_refcoco_format_reads_back(synthetic_data: SyntheticPaths, split: str) -> None:
    per_ref = RefCocoDataset(**synthetic_data.refcoco_kwargs(split), group_by_image=False, text_mode="all")
    per_image = RefCocoDataset(**synthetic_data.refcoco_kwargs(split))
    assert len(per_image) == (12 if split == "train" else 6)
    assert len(per_ref) == sum(sample.num_objects for sample in per_image)
    sizes = set()
    for sample in per_ref:
        assert isinstance(sample, GroundingSample)
        sizes.add(sample.image.size)
        assert sample.masks.flatten(1).any(dim=1).all()
        for k, phrase in enumerate(sample.phrases):
            colour = next(name for name in COLOURS if name in phrase.split())
            assert any(kind in phrase for kind in SHAPE_KINDS)
            assert phrase == phrase.lower()
            # The mask covers the shape the phrase names: its pixels have the named colour.
            assert np.abs(mean_colour(sample, k) - COLOURS[colour]).max() < 25
    assert sizes == {(256, 256), (256, 192)}


@pytest.mark.parametrize("split", ["train", "val"])
def test_png_format_reads_back(synthetic_data: SyntheticPaths, split: str) -> None:
    narratives = PNGDataset(**synthetic_data.png_kwargs(split))
    refs = RefCocoDataset(**synthetic_data.refcoco_kwargs(split))
    assert len(narratives) == len(refs) and narratives.num_ungrounded_dropped == 0
    plurals = ungrounded = 0
    for narrative, referring in zip(narratives, refs, strict=True):
        assert narrative.image_id == referring.image_id
        assert narrative.masks.flatten(1).any(dim=1).all()
        # The last object is the background (stuff); the masks of all objects tile the image.
        assert narrative.phrases[-1] == "a textured background" and not narrative.is_thing[-1]
        assert narrative.is_thing[:-1].all()
        assert torch.equal(
            narrative.masks.sum(dim=0), torch.ones(narrative.masks.shape[1:], dtype=torch.long)
        )
        # Both formats describe the same shapes: the union of the shape masks agrees.
        assert torch.equal(narrative.masks[:-1].any(dim=0), referring.masks.any(dim=0))
        plurals += int(narrative.is_plural.sum())
        ungrounded += sum(index < 0 for _, index in narrative.utterances)
    assert ungrounded > 0
    if split == "train":
        assert plurals > 0


def annotation_bytes(paths: SyntheticPaths) -> dict[str, bytes]:
    files = [paths.refcoco_instances, paths.refcoco_refs, *paths.png_narratives.values()]
    files += [*paths.panoptic_json.values()]
    files += sorted(file for directory in paths.panoptic_dir.values() for file in directory.iterdir())
    return {str(file.relative_to(paths.root)): file.read_bytes() for file in files}


def test_deterministic(tmp_path: Path) -> None:
    first = write_synthetic_dataset(tmp_path / "a", num_train=4, num_val=2, seed=3)
    second = write_synthetic_dataset(tmp_path / "b", num_train=4, num_val=2, seed=3)
    other_seed = write_synthetic_dataset(tmp_path / "c", num_train=4, num_val=2, seed=4)
    assert annotation_bytes(first) == annotation_bytes(second)
    assert annotation_bytes(first) != annotation_bytes(other_seed)
    images = sorted(path.name for path in first.image_dir.iterdir())
    assert images == sorted(path.name for path in second.image_dir.iterdir())
    assert all(
        (first.image_dir / name).read_bytes() == (second.image_dir / name).read_bytes() for name in images
    )


def test_idempotent_and_rebuilt_when_parameters_change(tmp_path: Path) -> None:
    paths = write_synthetic_dataset(tmp_path, num_train=4, num_val=2)
    stamp = paths.refcoco_instances.stat().st_mtime_ns
    assert write_synthetic_dataset(tmp_path, num_train=4, num_val=2) == paths
    assert paths.refcoco_instances.stat().st_mtime_ns == stamp

    write_synthetic_dataset(tmp_path, num_train=2, num_val=1)
    assert len(list(paths.image_dir.iterdir())) == 3  # the earlier build's extra images are gone
    assert len(RefCocoDataset(**paths.refcoco_kwargs("train"))) == 2
