"""The entry points end to end on the tiny demo: train -> checkpoint -> eval / resume / predict, W&B, DDP.

One short training run (module fixture) feeds most tests: the machine is small and a CPU step is seconds.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from pycocotools import mask as mask_utils
from wandb.proto import wandb_internal_pb2

from flmm_lightning.assets.synthetic_data import REFCOCO_DATASET, REFCOCO_SPLIT_BY
from flmm_lightning.eval import evaluate
from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.outputs.reporting import read_metrics_json
from flmm_lightning.predict import predict
from flmm_lightning.runs.checkpoints import load_checkpoint
from flmm_lightning.train import train

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STEPS = 2
# Test loops stop after this many batches (of data.eval_batch_size samples) per split, in training and in
# the evaluations compared with it.
TEST_BATCHES = 2
PHOTO = "coco_sample/images/000000142238.jpg"
PHRASES = ["the man in the white shirt", "the grass"]

Results = dict[str, dict[str, float]]


def run_overrides(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """The demo on the small synthetic dataset, writing into ``run_dir`` (set explicitly: outside the
    Hydra CLI nothing sets ``paths.output_dir``); later overrides win over ``tiny_overrides``'."""
    replaced = {override.split("=", 1)[0] for override in extra}
    base = [o for o in tiny_overrides(data_dir, run_dir) if o.split("=", 1)[0] not in replaced]
    return [*base, f"paths.output_dir={run_dir}", *extra]


def assert_same_results(actual: Results, expected: Results, tolerance: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for split, values in expected.items():
        assert actual[split].keys() == values.keys(), split
        for name, value in values.items():
            other = actual[split][name]
            assert (math.isnan(value) and math.isnan(other)) or abs(other - value) <= tolerance, (
                f"{split}/{name}: {other} != {value}"
            )


pytestmark = pytest.mark.usefixtures("pinned_threads")


@dataclass
class DemoRun:
    cfg: DictConfig
    results: Results
    run_dir: Path
    data_dir: Path

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def demo_run(compose_config: Callable[..., DictConfig], tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """``+experiment=demo`` for STEPS steps with one validation (which logs the W&B overlay panels), then
    the test splits; W&B offline."""
    data_dir, run_dir = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("demo")
    overrides = run_overrides(
        data_dir,
        run_dir,
        "logger=wandb",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every_n_steps=1",
        f"trainer.val_check_interval={STEPS}",
        "trainer.limit_val_batches=2",
        f"trainer.limit_test_batches={TEST_BATCHES}",
    )
    cfg = compose_config(overrides)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        results = train(cfg)
    return DemoRun(cfg, results, run_dir, data_dir)


def evaluated_samples(cfg: DictConfig, split: str, num_batches: int | None = None) -> Iterator:
    """The samples of ``split`` a test loop sees: the first ``num_batches`` batches, in dataset order."""
    dataset = instantiate(cfg.data.test_sets[split])
    count = len(dataset) if num_batches is None else min(len(dataset), num_batches * cfg.data.eval_batch_size)
    return (dataset[index] for index in range(count))


def whole_image_ciou(synthetic_root: Path, split: str) -> float:
    """cIoU of predicting the whole image for every referred object, straight from the annotation files."""
    refs = pickle.loads((synthetic_root / REFCOCO_DATASET / f"refs({REFCOCO_SPLIT_BY}).p").read_bytes())
    instances = json.loads((synthetic_root / REFCOCO_DATASET / "instances.json").read_text())
    annotations = {annotation["id"]: annotation for annotation in instances["annotations"]}
    images = {image["id"]: image for image in instances["images"]}
    areas, image_areas = 0.0, 0.0
    for ref in refs:
        if ref["split"] == split:
            areas += float(mask_utils.area(annotations[ref["ann_id"]]["segmentation"]))
            image = images[ref["image_id"]]
            image_areas += image["width"] * image["height"]
    return areas / image_areas


# ---------------------------------------------------------------------------------------------- train
def test_demo_run_writes_metrics_overlays_and_checkpoint(demo_run: DemoRun) -> None:
    metrics = read_metrics_json(demo_run.run_dir / "metrics.json")
    assert_same_results(metrics, demo_run.results)
    val = metrics["synthetic_refcoco_val"]
    assert 0.0 <= val["cIoU"] <= 1.0 and 0.0 <= val["mIoU"] <= 1.0
    expected_baseline = whole_image_ciou(Path(demo_run.cfg.data.synthetic.root), "val")
    assert metrics["baseline_whole_image"]["cIoU"] == pytest.approx(expected_baseline, rel=1e-9)
    # The keyword selector is scored on the narrative split; marking every word finds no synthetic phrase,
    # each of which has several words.
    assert 0.0 <= metrics["synthetic_png_val"]["selector_phrase_F1"] <= 1.0
    narratives = json.loads(Path(demo_run.cfg.data.val_sets.synthetic_png_val.narratives_json).read_text())
    grounded = [s["utterance"] for n in narratives for s in n["segments"] if s["segment_ids"]]
    assert grounded and all(len(utterance.split()) > 1 for utterance in grounded)
    assert metrics["baseline_every_word"]["selector_phrase_F1"] == 0.0
    # Ground what you say: the selector's phrases of the same narratives, grounded and scored like PNG.
    said = metrics["ground_what_you_say"]
    assert 0.0 <= said["AR"] <= 1.0 and 0.0 <= said["Acc@0.5"] <= 1.0
    # After testing, the demo answers and segments a few synthetic ReasonSeg queries.
    reasoning = metrics["synthetic_reasonseg_val"]
    assert set(reasoning) == {
        *(f"{kind}IoU{suffix}" for kind in "gc" for suffix in ("", "_short", "_long")),
        "coarse_gIoU",
        "coarse_cIoU",
    }
    assert 0.0 <= reasoning["gIoU"] <= 1.0 and 0.0 <= reasoning["cIoU"] <= 1.0
    # The demo ends with one chat turn about a validation image.

    turn = json.loads((demo_run.run_dir / "chat" / "turn_01.json").read_text())
    assert turn["question"] == demo_run.cfg.chat_after_fit.question and turn["answer"]
    assert (demo_run.run_dir / "chat" / "turn_01_overlay.png").is_file()

    num_images = demo_run.cfg.callbacks.mask_overlays.num_images
    for split in demo_run.cfg.data.test_sets:
        overlays = sorted((demo_run.run_dir / "overlays" / split).glob("*_pred_vs_gt.png"))
        expected = min(num_images, len(list(evaluated_samples(demo_run.cfg, split, TEST_BATCHES))))
        assert len(overlays) == expected, split
        with Image.open(overlays[0]) as overlay:
            assert overlay.format == "PNG" and overlay.width > overlay.height  # prediction | ground truth

    checkpoint = load_checkpoint(demo_run.checkpoint)
    assert checkpoint["global_step"] == STEPS
    assert checkpoint["flmm_config"]["model"]["name"] == demo_run.cfg.model.name
    assert not any(
        key.startswith(("model.lmm.model.", "model.sam.sam.image_encoder."))
        for key in checkpoint["state_dict"]
    )


def wandb_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """The records of an offline ``run-<id>.wandb`` file: a 7-byte header (":W&B", magic, version), then a
    LevelDB log (32 KiB blocks; each chunk: crc32, length, type FULL/FIRST/MIDDLE/LAST) of protobuf records.
    wandb no longer ships a reader for it."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, parts = 32768, 7, []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack_from("<HB", data, position + 4)
        parts.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record
        elif kind == 0:
            parts = []


def test_wandb_offline_run_holds_metrics_and_overlay_panels(demo_run: DemoRun) -> None:
    runs = list((demo_run.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    history: dict[str, list[str]] = {}
    for record in wandb_records(next(runs[0].glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(item.value_json)

    # the learning rate of each parameter group (the heads', the keyword selector's)
    assert len(history["train/loss"]) == STEPS
    assert {"lr-AdamW/heads", "lr-AdamW/keyword_selector"} <= set(history)
    for split, values in demo_run.results.items():
        if not split.startswith("baseline_"):
            for name, value in values.items():
                if not math.isnan(value):  # the test loop's values are the last logged
                    assert float(history[f"{split}/{name}"][-1]) == pytest.approx(value, rel=1e-6)
    # the validation's overlay panel: an image list with its files under files/, all of the panel's size
    # (the synthetic images are 256x256 and 256x192: the smaller ones are padded)
    panel = "synthetic_refcoco_val/overlays"
    assert json.loads(history[f"{panel}/_type"][-1]) == "images/separated"
    filenames = json.loads(history[f"{panel}/filenames"][-1])
    assert len(filenames) == json.loads(history[f"{panel}/count"][-1]) >= 1
    panel_size = (json.loads(history[f"{panel}/width"][-1]), json.loads(history[f"{panel}/height"][-1]))
    for filename in filenames:
        with Image.open(runs[0] / "files" / filename) as image:
            assert image.format == "PNG" and image.size == panel_size

    # the run's config: the resolved hyper-parameters that tell the runs of a sweep apart
    config: dict[str, object] = {}
    for record in wandb_records(next(runs[0].glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
    for section in ("model", "sam", "data", "module", "trainer"):
        assert section in config, section
    stored = {key: value.get("value", value) for key, value in config.items() if isinstance(value, dict)}
    assert stored["module"]["optimizer"]["lr"] == demo_run.cfg.module.optimizer.lr
    assert stored["trainer"]["max_steps"] == STEPS
    assert stored["data"]["batch_size"] == demo_run.cfg.data.batch_size


# ---------------------------------------------------------------------------------------------- eval
def test_eval_from_checkpoint_alone_reproduces_the_training_metrics(
    demo_run: DemoRun,
    compose_config: Callable[..., DictConfig],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    overrides = [
        f"ckpt={demo_run.checkpoint}",
        f"paths.output_dir={tmp_path}",
        f"hydra.run.dir={tmp_path}",
        f"trainer.limit_test_batches={TEST_BATCHES}",
    ]
    results = evaluate(compose_config(overrides, config_name="eval"))

    trained = {
        split: values for split, values in demo_run.results.items() if split in demo_run.cfg.data.test_sets
    }
    assert_same_results(results, trained)
    assert_same_results(read_metrics_json(tmp_path / "metrics.json"), trained)

    printed = capsys.readouterr().out
    for split, values in trained.items():
        assert split in printed
        shown = values.get("cIoU", values.get("AR"))
        assert f"{100 * shown:.2f}" in printed

    with (tmp_path / "per_object.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for split in trained:
        expected = [
            (str(sample.image_id), object_id, phrase)
            for sample in evaluated_samples(demo_run.cfg, split, TEST_BATCHES)
            for object_id, phrase in zip(sample.object_ids, sample.phrases, strict=True)
        ]
        split_rows = [row for row in rows if row["split"] == split]
        assert [(row["image_id"], row["object_id"], row["phrase"]) for row in split_rows] == expected
        # the per-object columns average to the split's figures (mIoU: mean per-object IoU)
        columns = {"coarse_iou": "coarse_mIoU", "box_iou": "box_mIoU", "coarse_box_iou": "coarse_box_mIoU"}
        if "mIoU" in trained[split]:
            columns["iou"] = "mIoU"
        for column, metric in columns.items():
            mean = np.mean([float(row[column]) for row in split_rows])
            assert mean == pytest.approx(trained[split][metric], abs=1e-5), (split, column)


# ---------------------------------------------------------------------------------------------- resume
def test_resume_continues_step_optimizer_and_schedule(
    demo_run: DemoRun, compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    saved = load_checkpoint(demo_run.checkpoint)
    overrides = run_overrides(
        demo_run.data_dir,
        tmp_path,
        f"ckpt_path={demo_run.checkpoint}",
        f"trainer.max_steps={STEPS + 1}",
        "test_after_fit=false",
        "whole_image_baseline_split=null",
        "reasonseg_after_fit.data=null",
        # a checkpoint after every step: the files name the steps this run trained
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.save_top_k=-1",
    )
    train(compose_config(overrides))

    folder = tmp_path / "checkpoints"
    assert sorted(path.name for path in folder.glob("step_*.ckpt")) == [f"step_{STEPS + 1:06d}.ckpt"]
    resumed = load_checkpoint(folder / "last.ckpt")
    assert resumed["global_step"] == saved["global_step"] + 1
    saved_steps = {int(state["step"]) for state in saved["optimizer_states"][0]["state"].values()}
    resumed_steps = {int(state["step"]) for state in resumed["optimizer_states"][0]["state"].values()}
    assert saved_steps == {STEPS} and resumed_steps == {STEPS + 1}
    assert resumed["lr_schedulers"][0]["last_epoch"] == saved["lr_schedulers"][0]["last_epoch"] + 1
    # The saved run's schedule had decayed to 0 at its last step; the longer run's schedule has not, so the
    # resumed step must train (its lr is recomputed for this run, not taken from the old optimizer state).
    head = "model.mask_head.conv_seg.weight"
    assert not torch.equal(resumed["state_dict"][head], saved["state_dict"][head])


# ---------------------------------------------------------------------------------------------- predict
def test_predict_writes_overlay_and_rles_of_the_grounder_masks(
    demo_run: DemoRun, compose_config: Callable[..., DictConfig], fixtures_dir: Path, tmp_path: Path
) -> None:
    photo = fixtures_dir / PHOTO
    overrides = [
        f"ckpt={demo_run.checkpoint}",
        f"image={photo}",
        f"phrases=[{', '.join(PHRASES)}]",
        "device=cpu",
        f"paths.output_dir={tmp_path}",
    ]
    overlay_path, json_path = predict(compose_config(overrides, config_name="predict"))

    grounding = Grounder.from_checkpoint(demo_run.checkpoint, device="cpu").ground(Image.open(photo), PHRASES)
    with Image.open(photo) as image, Image.open(overlay_path) as overlay:
        assert overlay.format == "PNG" and overlay.size == image.size
        assert grounding.masks.shape == (len(PHRASES), image.height, image.width)
    objects = json.loads(json_path.read_text())["objects"]
    assert [record["phrase"] for record in objects] == PHRASES
    for record, mask in zip(objects, grounding.masks, strict=True):
        rle = {"size": record["segmentation"]["size"], "counts": record["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_utils.decode(rle).astype(bool), mask.numpy())
        assert record["area"] == int(mask.sum())


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_spawn_trains_and_evaluates_like_a_single_process(
    demo_run: DemoRun,
    compose_config: Callable[..., DictConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two gloo processes (ddp_spawn) train STEPS steps; a 2-process evaluation of their checkpoint gives
    the metrics and the per-object table of a single-process one (every sample on exactly one rank).

    The per-object IoUs are compared exactly because both evaluations do the same arithmetic: one sample
    per batch (a batch's padding changes float rounding: rank r of R batches samples r, r + R, ... together)
    and the intra-op thread count of this process in the spawned workers too (a reduction split over
    another number of threads rounds differently)."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    run_dir = tmp_path / "ddp"
    overrides = run_overrides(
        demo_run.data_dir,
        run_dir,
        "trainer=ddp_cpu",
        f"trainer.max_steps={STEPS}",
        "data.batch_size=1",
        "data.eval_batch_size=1",
        "test_after_fit=false",  # every spawn costs two fresh interpreters: the evaluation below tests
        "whole_image_baseline_split=null",
        "reasonseg_after_fit.data=null",
    )
    train(compose_config(overrides))
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert load_checkpoint(checkpoint)["global_step"] == STEPS

    def evaluate_in(folder: Path, *extra: str) -> tuple[Results, list[dict[str, str]]]:
        cfg = compose_config([f"ckpt={checkpoint}", f"paths.output_dir={folder}", *extra], config_name="eval")
        results = evaluate(cfg)
        with (folder / "per_object.csv").open() as handle:
            return results, list(csv.DictReader(handle))

    distributed, distributed_rows = evaluate_in(tmp_path / "eval_ddp", "trainer=ddp_cpu")
    single, single_rows = evaluate_in(tmp_path / "eval_single")
    assert set(single) == set(demo_run.cfg.data.test_sets)
    assert_same_results(distributed, single)
    assert_same_results(read_metrics_json(tmp_path / "eval_ddp" / "metrics.json"), single)
    assert distributed_rows == single_rows
