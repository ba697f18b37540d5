"""RefCOCO / RefCOCO+ / RefCOCOg in the refer API's layout: ``instances.json`` + ``refs(<split_by>).p``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from flmm_lightning.boundaries import GroundingSample, SkippedSample
from flmm_lightning.data.bad_samples import (
    BadSampleError,
    BadSampleReason,
    OnBadSample,
    check_on_bad_sample,
    load_or_skip,
)
from flmm_lightning.data.images import load_rgb_image
from flmm_lightning.data.records import read_field, read_json, read_records
from flmm_lightning.data.safe_pickle import load_refs

TextMode = Literal["random_once", "random_per_epoch", "first", "all"]
# The values ``text_mode`` accepts (see RefCocoDataset).
TEXT_MODES: tuple[str, ...] = ("random_once", "random_per_epoch", "first", "all")
# Earlier names, still read from the configs stored in older checkpoints: same behaviour as before.
LEGACY_TEXT_MODES: dict[str, str] = {"select_first": "first", "random": "random_per_epoch"}
# Every value a config may hold: the current names and the earlier ones.
ACCEPTED_TEXT_MODES: tuple[str, ...] = (*TEXT_MODES, *LEGACY_TEXT_MODES)


def decode_segmentation(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as a uint8 ``[height, width]`` mask.

    Raises ``ValueError`` when an RLE was encoded for another size: its runs would land on wrong pixels.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict):
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"RLE of size {size[0]}x{size[1]} (HxW) on an image of {height}x{width}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"unknown segmentation type {type(segmentation).__name__}")
    return mask_utils.decode(rle)


def checked_ref(ref: Any, index: int, path: Path) -> dict[str, Any]:
    """A record of a refs file with the fields the dataset reads (``ref_id``, ``ann_id``, ``image_id``,
    ``split``, ``sentences`` with their ``raw`` text); a ``RecordError`` names the file, ref and field."""
    where = f"ref #{index}"
    ref_id = read_field(ref, "ref_id", (int,), path, where)
    where = f"ref #{index} (ref_id={ref_id})"
    for field in ("ann_id", "image_id"):
        read_field(ref, field, (int,), path, where)
    read_field(ref, "split", (str,), path, where)
    for number, sentence in enumerate(read_field(ref, "sentences", (list,), path, where)):
        read_field(sentence, "raw", (str,), path, f"{where}, sentences[{number}]")
    return ref


@dataclass(frozen=True)
class _Ref:
    ref_id: int
    ann_id: int
    sentences: tuple[str, ...]


@dataclass(frozen=True)
class _Item:
    sample_id: str
    image_id: int
    file_name: str
    width: int
    height: int
    refs: tuple[_Ref, ...]
    # A problem found while indexing; under on_bad_sample="skip" it is reported when the item is read.
    problem: BadSampleError | None = None


class RefCocoDataset(Dataset):
    """One split of a refer API dataset; each item a ``GroundingSample`` (or a ``SkippedSample``).

    Files: ``<data_root>/<dataset>/instances.json``, ``<data_root>/<dataset>/refs(<split_by>).p`` and the
    images ``<data_root>/<image_dir>/<file_name of instances.json>``. Splits are whatever the refs file
    holds (refcoco/refcoco+ unc: train/val/testA/testB; refcocog umd: train/val/test; google: train/val).

    ``text_mode`` picks which sentences of each ref become objects:

    - ``random_once``: one sentence per ref, drawn once for the dataset's life from ``(seed, ref_id)``, as
      mmdet's ``RefCocoDataset`` (the reference's training data) draws it when the dataset is built; the
      same sentence in every epoch, in every worker and after a resume;
    - ``random_per_epoch``: a new sentence per ref and epoch, drawn from ``(seed, epoch, ref_id)`` alone, so
      the same whichever worker reads the item and whatever the worker count, and a resumed run draws what
      an uninterrupted one would. The training sampler passes the epoch (``set_epoch``; 0 until then);
    - ``first``: the first sentence (the reference's evaluation protocol);
    - ``all``: one object per sentence, each with the ref's mask.

    ``select_first`` and ``random``, the earlier names of ``first`` and ``random_per_epoch``, are still read.
    Sentences are the ``raw`` text lower-cased, as mmdet gives them; whitespace is kept, so a trailing space
    is a token of the phrase, as in the reference. ``strip_sentences=True`` also strips them.

    The reference's "concat" mode (all refs of an image in one sequence) is ``group_by_image=True``: one
    sample per image holding every ref of the split on it, in the refs file's order. ``group_by_image=False``
    gives one sample per ref. ``object_ids`` are the ref ids (repeated per sentence under ``all``).
    """

    # How an evaluation split of this dataset is scored (referring expression segmentation: cIoU, mIoU, Pr@t).
    eval_kind = "res"

    def __init__(
        self,
        data_root: str | Path,
        dataset: str,
        split_by: str,
        split: str,
        image_dir: str | Path,
        text_mode: TextMode = "first",
        group_by_image: bool = True,
        on_bad_sample: OnBadSample = "raise",
        seed: int = 0,
        strip_sentences: bool = False,
    ) -> None:
        if text_mode not in ACCEPTED_TEXT_MODES:
            hint = " (the reference's concat mode is group_by_image=True)" if text_mode == "concat" else ""
            raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}{hint}")
        text_mode = LEGACY_TEXT_MODES.get(text_mode, text_mode)
        self.on_bad_sample = check_on_bad_sample(on_bad_sample)
        self.text_mode = text_mode
        self.strip_sentences = strip_sentences
        self.group_by_image = group_by_image
        self.seed = seed
        self.name = f"{dataset}({split_by})/{split}"
        self.image_root = Path(data_root) / image_dir
        self.refs_path = Path(data_root) / dataset / f"refs({split_by}).p"
        self.instances_path = Path(data_root) / dataset / "instances.json"

        all_refs = [
            checked_ref(ref, index, self.refs_path) for index, ref in enumerate(load_refs(self.refs_path))
        ]
        splits = sorted({str(ref["split"]) for ref in all_refs})
        if split not in splits:
            raise ValueError(f"{self.refs_path}: no split {split!r}; splits in this file: {splits}")
        refs = [ref for ref in all_refs if ref["split"] == split]
        instances = read_json(self.instances_path)
        images, annotations = self._index_instances(instances)
        # Only the annotations this split uses are kept: a full instances.json is large, and every
        # dataloader worker holds a copy of the dataset.
        self._segmentations: dict[int, Any] = {}
        for ann_id in (ref["ann_id"] for ref in refs):
            if ann_id in annotations:
                index, annotation = annotations[ann_id]
                where = f"annotations[{index}] (id={ann_id})"
                read_field(annotation, "image_id", (int,), self.instances_path, where)
                segmentation = read_field(
                    annotation, "segmentation", (list, dict), self.instances_path, where
                )
                self._segmentations[ann_id] = segmentation
        annotations = {ann_id: annotation for ann_id, (_, annotation) in annotations.items()}
        self._items = self._index(refs, images, annotations)
        self.epoch = 0

    def _index_instances(self, instances: Any) -> tuple[dict[int, dict], dict[int, tuple[int, dict]]]:
        """instances.json's images by id (their fields checked), its annotations by id (with their index)."""
        path = self.instances_path
        images = {}
        for index, image in enumerate(read_records(instances, "images", path)):
            where = f"images[{index}]"
            image_id = read_field(image, "id", (int,), path, where)
            read_field(image, "file_name", (str,), path, f"{where} (id={image_id})")
            for field in ("width", "height"):
                read_field(image, field, (int,), path, f"{where} (id={image_id})")
            images[image_id] = image
        annotations = {
            read_field(annotation, "id", (int,), path, f"annotations[{index}]"): (index, annotation)
            for index, annotation in enumerate(read_records(instances, "annotations", path))
        }
        return images, annotations

    def _index(
        self, refs: list[dict[str, Any]], images: dict[int, dict], annotations: dict[int, dict]
    ) -> list[_Item]:
        groups: dict[int, list[dict[str, Any]]] = {}
        for ref in refs:
            key = ref["image_id"] if self.group_by_image else ref["ref_id"]
            groups.setdefault(key, []).append(ref)
        items = []
        for key, group in groups.items():
            sample_id = f"image_id={key}" if self.group_by_image else f"ref_id={key}"
            item = self._make_item(sample_id, group, images, annotations)
            if item.problem is not None and self.on_bad_sample == "raise":
                raise item.problem
            items.append(item)
        return items

    def _make_item(
        self,
        sample_id: str,
        group: list[dict[str, Any]],
        images: dict[int, dict],
        annotations: dict[int, dict],
    ) -> _Item:
        image_id = group[0]["image_id"]
        image = images.get(image_id)
        refs = tuple(
            _Ref(ref["ref_id"], ref["ann_id"], tuple(self._normalise(s["raw"]) for s in ref["sentences"]))
            for ref in group
        )
        return _Item(
            sample_id=sample_id,
            image_id=int(image_id),
            file_name=image["file_name"] if image else "",
            width=int(image["width"]) if image else 0,
            height=int(image["height"]) if image else 0,
            refs=refs,
            problem=self._find_problem(sample_id, image_id, image, refs, annotations),
        )

    def _normalise(self, sentence: str) -> str:
        sentence = sentence.lower()
        return sentence.strip() if self.strip_sentences else sentence

    def _find_problem(
        self,
        sample_id: str,
        image_id: int,
        image: dict | None,
        refs: tuple[_Ref, ...],
        annotations: dict[int, dict],
    ) -> BadSampleError | None:
        """The cheap consistency checks between the refs file and instances.json."""
        if image is None:
            return self._indexing_error(sample_id, f"image_id {image_id} is not in {self.instances_path}")
        for ref in refs:
            annotation = annotations.get(ref.ann_id)
            if annotation is None:
                return self._indexing_error(
                    sample_id, f"ref_id {ref.ref_id}: ann_id {ref.ann_id} is not in {self.instances_path}"
                )
            if annotation["image_id"] != image_id:
                return self._indexing_error(
                    sample_id,
                    f"ref_id {ref.ref_id}: ann_id {ref.ann_id} is on image {annotation['image_id']} "
                    f"in {self.instances_path}, the ref says image {image_id}",
                )
            if not ref.sentences:
                return self._indexing_error(sample_id, f"ref_id {ref.ref_id} has no sentences")
        return None

    def _indexing_error(self, sample_id: str, detail: str) -> BadSampleError:
        return BadSampleError(
            self.name, sample_id, str(self.refs_path), BadSampleReason.MISSING_ANNOTATION, detail
        )

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> GroundingSample | SkippedSample:
        return load_or_skip(self._load, self._items[index], self.on_bad_sample)

    def _load(self, item: _Item) -> GroundingSample:
        image_path = self.image_root / item.file_name
        image = load_rgb_image(
            image_path, dataset=self.name, sample_id=item.sample_id, expected_wh=(item.width, item.height)
        )
        phrases: list[str] = []
        masks: list[np.ndarray] = []
        object_ids: list[str] = []
        for ref in item.refs:
            mask = self._decode(item, ref)
            for sentence in self._choose_sentences(ref):
                phrases.append(sentence)
                masks.append(mask)
                object_ids.append(str(ref.ref_id))
        count = len(phrases)
        return GroundingSample(
            image=image,
            phrases=phrases,
            # Stacked in numpy: small torch ops in the main process pay for its thread pool.
            masks=torch.from_numpy(np.stack(masks)),
            is_thing=torch.ones(count, dtype=torch.bool),
            is_plural=torch.zeros(count, dtype=torch.bool),
            image_id=item.image_id,
            file_name=item.file_name,
            object_ids=object_ids,
        )

    def _decode(self, item: _Item, ref: _Ref) -> np.ndarray:
        where = f"ref_id {ref.ref_id}, ann_id {ref.ann_id}"
        path = str(self.instances_path)
        try:
            mask = decode_segmentation(self._segmentations[ref.ann_id], item.height, item.width)
        except ValueError as error:
            reason = BadSampleReason.SIZE_MISMATCH
            raise BadSampleError(self.name, item.sample_id, path, reason, f"{where}: {error}") from error
        if not mask.any():
            reason = BadSampleReason.EMPTY_MASK
            raise BadSampleError(self.name, item.sample_id, path, reason, f"{where} decodes to an empty mask")
        return mask.astype(bool)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _choose_sentences(self, ref: _Ref) -> tuple[str, ...]:
        if self.text_mode == "first":
            return ref.sentences[:1]
        if self.text_mode == "all":
            return ref.sentences
        # A function of its key alone (no state): what a fresh copy of the dataset, in another worker or a
        # resumed run, draws too.
        per_epoch = [self.epoch] if self.text_mode == "random_per_epoch" else []
        key = [self.seed, *per_epoch, ref.ref_id]
        return (ref.sentences[int(np.random.default_rng(key).integers(len(ref.sentences)))],)
