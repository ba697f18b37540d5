"""Batch prediction (``predict inputs=<manifest>``): the batched masks are ``Grounder.ground``'s, two gloo
processes write the lines one process writes, a run cut short and re-run holds every input once, bad inputs
become error lines, and the three manifest formats name the same inputs."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_images import rgb_bomb
from lightning import Callback, LightningModule, Trainer
from omegaconf import DictConfig
from PIL import Image
from pycocotools import mask as mask_utils

from flmm_lightning.inference.batch import (
    ManifestError,
    OutputMismatchError,
    PredictionOutput,
    predict_batch,
    read_manifest,
)
from flmm_lightning.inference.batch.output import PREDICTIONS, prediction_line
from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.predict import main

pytestmark = pytest.mark.usefixtures("pinned_threads")

PHOTOS = ("000000142238.jpg", "000000439180.jpg")
PHRASES = [["the man", "the ball"], ["a dog"], ["the sky", "a tree", "grass"]]


@pytest.fixture(scope="module")
def grounder(tiny_checkpoint: Path) -> Grounder:
    return Grounder.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seven images of five different sizes (crops and scalings of the two fixture photos), small enough
    for the CPU; among them a portrait and a tiny one."""
    folder = tmp_path_factory.mktemp("images")
    fixtures = Path(__file__).parent / "fixtures" / "coco_sample" / "images"
    sizes = [(96, 72), (64, 96), (80, 80), (96, 72), (40, 30), (64, 96), (88, 60)]
    for index, size in enumerate(sizes):
        with Image.open(fixtures / PHOTOS[index % 2]) as photo:
            crop = photo.convert("RGB").crop((10 * index, 5 * index, 10 * index + 300, 5 * index + 260))
        crop.resize(size).save(folder / f"img{index}.png")
    return folder


def write_manifest(folder: Path, lines: list[str]) -> Path:
    path = folder / "manifest.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def manifest(image_dir: Path) -> Path:
    """One line per image (relative paths), phrases from PHRASES in turn, ids given to all but one."""
    lines = []
    for index in range(7):
        record = {"image": f"img{index}.png", "phrases": PHRASES[index % 3]}
        if index != 3:
            record["id"] = f"photo-{index}"
        lines.append(json.dumps(record))
    return write_manifest(image_dir, lines)


def batch_config(
    compose_config: Callable[..., DictConfig], checkpoint: Path, inputs: Path, out: Path, *extra: str
) -> DictConfig:
    overrides = [f"ckpt={checkpoint}", f"inputs={inputs}", f"output={out}", f"paths.output_dir={out}_run"]
    return compose_config([*overrides, "batch.num_workers=0", *extra], config_name="predict")


def read_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]


def decoded(record: dict) -> np.ndarray:
    rle = {"size": record["segmentation"]["size"], "counts": record["segmentation"]["counts"].encode()}
    return mask_utils.decode(rle).astype(bool)


@pytest.fixture(scope="module")
def batched_run(compose_config, tiny_checkpoint: Path, manifest: Path, tmp_path_factory) -> Path:
    """The manifest predicted in batches of 4 (two batches, four image sizes in the first)."""
    out = tmp_path_factory.mktemp("batched") / "out"
    summary = predict_batch(batch_config(compose_config, tiny_checkpoint, manifest, out, "batch.size=4"))
    assert (summary.inputs, summary.done, summary.failed, summary.processed) == (7, 7, 0, 7)
    return out


# Batching changes no input of any sample: padding tokens are masked out of attention (weight exactly 0) and
# every image is encoded and decoded at its own size. What changes is how fp32 matrix products of other
# shapes are blocked: each product is the same sum in another order, each term rounded to 2^-24 relative.
# The tiny model's depth (LMM layers, U-Net, SAM decoder) compounds that to far below 1e-4 of the largest
# logit magnitude (measured on this model: under 4e-6); a pixel may only change sides where its one-image
# logit is within that of 0.
RELATIVE_TOLERANCE = 1e-4


def test_batched_masks_equal_one_image_grounder_masks(
    batched_run: Path, grounder: Grounder, image_dir: Path
) -> None:
    lines = read_lines(batched_run)
    assert [line["index"] for line in lines] == list(range(7))
    assert [line["id"] for line in lines] == [f"photo-{i}" if i != 3 else "line4" for i in range(7)]
    for index, line in enumerate(lines):
        image = image_dir / f"img{index}.png"
        single = grounder.ground(image, PHRASES[index % 3])
        logits = grounder_logits(grounder, image, PHRASES[index % 3])
        tolerance = RELATIVE_TOLERANCE * float(logits.abs().max())
        assert [obj["phrase"] for obj in line["objects"]] == PHRASES[index % 3]
        for k, obj in enumerate(line["objects"]):
            mask = torch.from_numpy(decoded(obj))
            assert mask.shape == single.masks[k].shape == (Image.open(image).height, Image.open(image).width)
            differing = mask != single.masks[k]
            assert (logits[k][differing].abs() <= tolerance).all(), f"line {index} object {k}"
            assert obj["area"] == int(mask.sum())
            if not differing.any():
                # the mean of sigmoids (slope at most 1/4) over the same pixels, plus float32 rounding
                expected = float(single.scores[k])
                assert obj["mask_score"] == pytest.approx(expected, abs=tolerance / 4 + 1e-6)
            if mask.any():
                assert obj["bbox_xyxy"] == pytest.approx(single.boxes[k].tolist(), abs=1)
            else:
                assert obj["bbox_xyxy"] is None


def grounder_logits(grounder: Grounder, image: Path, phrases: list[str]) -> torch.Tensor:
    """The fine logits ``[n, H, W]`` of one image alone, through the same core call as ``Grounder.ground``."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from flmm_lightning.boundaries import GroundingSample
    from flmm_lightning.data.images import load_photo

    sample = GroundingSample.for_inference(load_photo(image), phrases)
    batch = move_data_to_device(grounder.collate([grounder.encode.encode(sample)]), grounder.device)
    with torch.no_grad():
        return grounder.model(batch)[0].fine_logits.cpu()


class StopAfter(Callback):
    """Presses Ctrl-C once ``batches`` batches have been written (it runs after the writer, which is the
    first callback)."""

    def __init__(self, batches: int) -> None:
        self.batches = batches
        self.seen = 0

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args, **kwargs) -> None:
        self.seen += 1
        if self.seen == self.batches:
            raise KeyboardInterrupt


def test_a_run_cut_short_and_rerun_holds_every_input_once(
    compose_config, tiny_checkpoint: Path, manifest: Path, batched_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cfg = batch_config(compose_config, tiny_checkpoint, manifest, out, "batch.size=2")
    handler = signal.getsignal(signal.SIGINT)
    try:
        # Lightning shuts down on Ctrl-C (ignoring further SIGINTs, restored below) and exits with status 1.
        with pytest.raises(SystemExit):
            predict_batch(cfg, callbacks=[StopAfter(batches=2)])
    finally:
        signal.signal(signal.SIGINT, handler)
    (shard,) = out.glob("predictions.rank*.part.jsonl")
    written = shard.read_text().splitlines()
    assert len(written) == 4  # two whole batches, each line complete
    # A write cut short by a kill leaves a half line; the resumed run must drop it, not keep or crash on it.
    with shard.open("a") as file:
        file.write(written[-1][:25])
    summary = predict_batch(cfg)
    assert (summary.done, summary.failed, summary.processed) == (7, 0, 3)
    lines = read_lines(out)
    assert [line["id"] for line in lines] == [line["id"] for line in read_lines(batched_run)]
    assert not list(out.glob("predictions.rank*"))
    # Nothing left to do: a third run writes nothing new and keeps the file as it is.
    before = (out / PREDICTIONS).read_text()
    assert predict_batch(cfg).processed == 0
    assert (out / PREDICTIONS).read_text() == before


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_gloo_processes_write_the_lines_of_one(
    compose_config, tiny_checkpoint: Path, manifest: Path, tmp_path: Path
) -> None:
    # One input per batch: each image is computed alone in both runs, so the lines must be identical.
    single, double = tmp_path / "single", tmp_path / "ddp"
    predict_batch(batch_config(compose_config, tiny_checkpoint, manifest, single, "batch.size=1"))
    ddp = batch_config(compose_config, tiny_checkpoint, manifest, double, "batch.size=1", "trainer=ddp_cpu")
    predict_batch(ddp)
    assert read_lines(double) == read_lines(single)
    assert not list(double.glob("predictions.rank*"))


def test_bad_inputs_become_error_lines_and_the_exit_status_says_so(
    compose_config, tiny_checkpoint: Path, image_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    good = image_dir / "img0.png"
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    lines = [
        json.dumps({"id": "ok", "image": str(good), "phrases": ["the man"]}),
        json.dumps({"id": "missing", "image": "nowhere.png", "phrases": ["the man"]}),
        json.dumps({"id": "truncated", "image": "truncated.png", "phrases": ["the man"]}),
        json.dumps({"id": "no-phrases", "image": str(good), "phrases": []}),
        '{"id": "broken", "image": ',
        json.dumps({"id": "query", "image": str(good), "query": "what is the man holding"}),
        json.dumps({"id": "huge", "image": str(rgb_bomb(tmp_path)), "phrases": ["the man"]}),
    ]
    manifest = write_manifest(tmp_path, lines)
    out = tmp_path / "out"
    overrides = [f"ckpt={tiny_checkpoint}", f"inputs={manifest}", f"output={out}", "batch.num_workers=0"]
    monkeypatch.setattr(
        "sys.argv", ["flmm-predict", *overrides, "generation.max_new_tokens=4", "batch.overlays=true"]
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert "5 of 7 inputs failed" in str(exit_info.value)
    records = {record["id"]: record for record in read_lines(out)}
    assert list(records) == ["ok", "missing", "truncated", "no-phrases", "line5", "query", "huge"]
    # measured before it is decoded: refused by the default image_limits, naming the file and its size
    assert "rgb_9000.png" in records["huge"]["error"] and "9000" in records["huge"]["error"]
    assert "image not found" in records["missing"]["error"] and "nowhere.png" in records["missing"]["error"]
    assert "truncated.png" in records["truncated"]["error"]
    assert "line 4" in records["no-phrases"]["error"] and "non-empty" in records["no-phrases"]["error"]
    assert "line 5: not JSON" in records["line5"]["error"]
    assert records["query"]["answer"].startswith("It is") and "segmentation" in records["query"]
    assert [obj["phrase"] for obj in records["ok"]["objects"]] == ["the man"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["ok.png", "query.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["inputs"], summary["done"], summary["failed"]) == (7, 2, 5)
    printed = capsys.readouterr().out
    assert "failed 5" in printed
    # the progress bar counts images (7 on this one process), at a rate in images/s
    assert "7/7" in printed and "img/s" in printed


def test_folder_and_coco_manifests_name_the_inputs_a_jsonl_would(image_dir: Path, tmp_path: Path) -> None:
    folder = read_manifest(image_dir, phrases=["a dog"])
    assert [entry.id for entry in folder] == [f"img{i}.png" for i in range(7)]
    assert all(entry.phrases == ("a dog",) for entry in folder)
    assert folder[2].image == str(image_dir / "img2.png")
    with pytest.raises(ManifestError, match="phrases="):
        read_manifest(image_dir)

    coco = {
        "images": [{"id": 5, "file_name": "img0.png"}, {"id": 6, "file_name": "img1.png"}],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"image_id": 5, "caption": "a man throws a ball"},
            {"image_id": 5, "caption": "a man on a field"},
            {"image_id": 6, "category_id": 2},
            {"image_id": 6, "category_id": 1},
            {"image_id": 6, "category_id": 2},
        ],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    entries = read_manifest(path, image_dir=image_dir)
    assert [(e.id, e.image, e.phrases) for e in entries] == [
        ("5", str(image_dir / "img0.png"), ("a man throws a ball", "a man on a field")),
        ("6", str(image_dir / "img1.png"), ("dog", "person")),
    ]

    jsonl = write_manifest(
        tmp_path,
        ['{"image": "a.png", "phrases": "one phrase"}', '{"image": "a.png", "query": "x", "id": "line1"}'],
    )
    with pytest.raises(ManifestError, match="its own phrases"):
        read_manifest(jsonl, phrases=["a dog"])
    first, second = read_manifest(jsonl)
    assert first.phrases == ("one phrase",) and first.image == str(tmp_path / "a.png")
    assert second.error is not None and "already used on line 1" in second.error


def test_an_output_folder_of_another_checkpoint_is_refused(tmp_path: Path) -> None:
    output = PredictionOutput(tmp_path / "out", {})
    output.claim({"ckpt": "/models/a.ckpt", "inputs": "/data/m.jsonl"})
    output.claim({"ckpt": "/models/a.ckpt", "inputs": "/data/m.jsonl"})  # the same run resumes
    with pytest.raises(OutputMismatchError, match="ckpt: /models/a.ckpt there, /models/b.ckpt now"):
        output.claim({"ckpt": "/models/b.ckpt", "inputs": "/data/m.jsonl"})


def test_a_prediction_line_is_valid_json_even_for_a_non_finite_score() -> None:
    record = {"id": "a", "objects": [{"phrase": "x", "mask_score": float("nan"), "area": 3}], "notices": []}
    line = prediction_line(record)
    assert line.endswith("\n") and line.count("\n") == 1
    parsed = json.loads(line)  # the standard parser; allow_nan=False wrote it
    assert parsed["objects"][0]["mask_score"] is None
    assert parsed["notices"] == [
        "objects[0].mask_score was not a finite number (NaN or infinity): written as null"
    ]
