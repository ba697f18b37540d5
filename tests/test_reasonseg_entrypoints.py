"""Reasoning segmentation through the entry points on the tiny offline models: ``eval data=<ReasonSeg>``
(each query answered by the LMM inside the reasoning evaluator's test step), alone and beside referring
splits, and ``predict query=...``."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_exit import cli_exit
from omegaconf import DictConfig, open_dict
from PIL import Image
from pycocotools import mask as mask_utils

from flmm_lightning.data import ReasonSegDataset
from flmm_lightning.eval import evaluate
from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.outputs.reporting import read_metrics_json
from flmm_lightning.predict import PredictInputError, main, predict

PHOTO = "coco_sample/images/000000142238.jpg"
MAX_NEW_TOKENS = 4
SPLIT = "synthetic_reasonseg_val"


pytestmark = pytest.mark.usefixtures("pinned_threads")


@pytest.fixture(scope="module")
def grounder(tiny_checkpoint: Path) -> Grounder:
    return Grounder.from_checkpoint(tiny_checkpoint, device="cpu")


def reasonseg_figures(ious: list[tuple[int, int, bool]]) -> dict[str, float]:
    """gIoU / cIoU overall, short and long, from (intersection, union, is_sentence) per query."""
    figures = {}
    for suffix, chosen in (("", (False, True)), ("_short", (False,)), ("_long", (True,))):
        rows = [(i, u) for i, u, sentence in ious if sentence in chosen]
        figures[f"gIoU{suffix}"] = float(np.mean([i / u if u else 1.0 for i, u in rows]))
        figures[f"cIoU{suffix}"] = sum(i for i, _ in rows) / sum(u for _, u in rows)
    return figures


@pytest.mark.slow
def test_eval_answers_each_query_and_scores_it_as_grounder_segment_does(
    tiny_checkpoint: Path,
    grounder: Grounder,
    tiny_config: DictConfig,
    compose_config: Callable[..., DictConfig],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data_dir = tiny_config.paths.data_dir
    overrides = [
        f"ckpt={tiny_checkpoint}",
        "data=synthetic_reasonseg",
        f"paths.data_dir={data_dir}",
        f"data.synthetic.num_train={tiny_config.data.synthetic.num_train}",
        f"data.synthetic.num_val={tiny_config.data.synthetic.num_val}",
        "data.num_workers=0",
        "data.eval_batch_size=3",
        f"generation.max_new_tokens={MAX_NEW_TOKENS}",
        f"paths.output_dir={tmp_path}",
        f"hydra.run.dir={tmp_path}",
    ]
    cfg = compose_config(overrides, config_name="eval")
    results = evaluate(cfg)

    # Independently: every query through the public Grounder.segment, scored with numpy.
    dataset = ReasonSegDataset(Path(data_dir) / "synthetic" / "reasonseg" / "val", query_mode="all")
    counts, queries = [], []
    for index in range(len(dataset)):
        sample = dataset[index]
        is_sentence = bool(sample.is_sentence[0])
        result = grounder.segment(
            sample.image, sample.phrases[0], is_sentence=is_sentence, max_new_tokens=MAX_NEW_TOKENS
        )
        assert result.mask.shape == (sample.image.height, sample.image.width)
        assert 0 < len(result.token_ids) <= MAX_NEW_TOKENS
        kept = ~sample.ignore_masks[0].numpy()
        pred, gt = result.mask.numpy() & kept, sample.masks[0].numpy() & kept
        counts.append((int((pred & gt).sum()), int((pred | gt).sum()), is_sentence))
        queries.append((sample.image_id, sample.phrases[0]))
    assert {sentence for _, _, sentence in counts} == {False, True}  # both rows are measured
    expected = reasonseg_figures(counts)

    assert list(results) == [SPLIT]
    figures = {name: results[SPLIT][name] for name in expected}
    assert figures == pytest.approx(expected, abs=1e-9)
    stored = read_metrics_json(tmp_path / "metrics.json")[SPLIT]
    assert {name: stored[name] for name in expected} == pytest.approx(expected, abs=1e-9)
    assert {"coarse_gIoU", "coarse_cIoU"} <= set(stored)

    printed = capsys.readouterr().out
    assert SPLIT in printed and f"{100 * expected['gIoU']:.2f}" in printed
    with (tmp_path / "per_object.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["image_id"], row["phrase"]) for row in rows] == [(str(i), q) for i, q in queries]
    assert np.mean([float(row["iou"]) for row in rows]) == pytest.approx(expected["gIoU"], abs=1e-5)


@pytest.mark.slow
def test_ddp_spawn_evaluation_of_reasoning_splits_equals_a_single_process(
    tiny_checkpoint: Path,
    tiny_config: DictConfig,
    compose_config: Callable[..., DictConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two gloo processes answer a share of the queries each; the gathered figures and per-query rows are
    those of one process (one query per batch and this process's thread count, as the RES/PNG DDP test)."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))

    def evaluate_in(folder: Path, *extra: str) -> tuple[dict[str, dict[str, float]], list[dict[str, str]]]:
        overrides = [
            f"ckpt={tiny_checkpoint}",
            "data=synthetic_reasonseg",
            f"paths.data_dir={tiny_config.paths.data_dir}",
            f"data.synthetic.num_train={tiny_config.data.synthetic.num_train}",
            f"data.synthetic.num_val={tiny_config.data.synthetic.num_val}",
            "data.num_workers=0",
            "data.eval_batch_size=1",
            f"generation.max_new_tokens={MAX_NEW_TOKENS}",
            f"paths.output_dir={folder}",
            f"hydra.run.dir={folder}",
            *extra,
        ]
        results = evaluate(compose_config(overrides, config_name="eval"))
        with (folder / "per_object.csv").open() as handle:
            return results, list(csv.DictReader(handle))

    distributed, distributed_rows = evaluate_in(tmp_path / "ddp", "trainer=ddp_cpu")
    single, single_rows = evaluate_in(tmp_path / "single")
    assert list(single) == list(distributed) == [SPLIT]
    assert distributed[SPLIT] == pytest.approx(single[SPLIT], abs=1e-12, nan_ok=True)
    assert distributed_rows == single_rows


def comparable(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """``results`` with NaN (an empty subset) as None, so that equal figures compare equal."""
    return {
        split: {name: None if math.isnan(value) else value for name, value in figures.items()}
        for split, figures in results.items()
    }


@pytest.mark.slow
def test_eval_of_a_config_mixing_reasoning_and_referring_splits_reports_every_split(
    tiny_checkpoint: Path,
    tiny_config: DictConfig,
    compose_config: Callable[..., DictConfig],
    tmp_path: Path,
) -> None:
    """The referring split is scored by the Lightning module, the reasoning split by the reasoning
    evaluator; one metrics.json and one per_object.csv hold both, in the data config's order, each split's
    figures and rows those of evaluating it alone."""
    reasoning = {
        "_target_": "flmm_lightning.data.reasonseg.ReasonSegDataset",
        "split_dir": "${data.synthetic.root}/reasonseg/val",
        "query_mode": "all",
    }

    def evaluate_in(folder: Path, *splits: str) -> tuple[dict[str, dict[str, float]], list[dict[str, str]]]:
        overrides = [
            f"ckpt={tiny_checkpoint}",
            "data=synthetic",
            f"paths.data_dir={tiny_config.paths.data_dir}",
            f"data.synthetic.num_train={tiny_config.data.synthetic.num_train}",
            f"data.synthetic.num_val={tiny_config.data.synthetic.num_val}",
            "data.num_workers=0",
            f"generation.max_new_tokens={MAX_NEW_TOKENS}",
            f"paths.output_dir={folder}",
            f"hydra.run.dir={folder}",
        ]
        cfg = compose_config(overrides, config_name="eval")
        configured = {"synthetic_refcoco_val": cfg.data.val_sets.synthetic_refcoco_val, SPLIT: reasoning}
        with open_dict(cfg):
            cfg.data.test_sets = {name: configured[name] for name in splits}
        results = evaluate(cfg)
        assert comparable(read_metrics_json(folder / "metrics.json")) == comparable(results)
        with (folder / "per_object.csv").open() as handle:
            return results, list(csv.DictReader(handle))

    referring, referring_rows = evaluate_in(tmp_path / "res", "synthetic_refcoco_val")
    reasoned, reasoned_rows = evaluate_in(tmp_path / "reasonseg", SPLIT)
    mixed, mixed_rows = evaluate_in(tmp_path / "mixed", SPLIT, "synthetic_refcoco_val")

    assert list(mixed) == [SPLIT, "synthetic_refcoco_val"]
    expected = {**reasoned, **referring}
    assert comparable(mixed) == comparable(expected)
    assert {"gIoU", "cIoU"} <= set(mixed[SPLIT]) and {"cIoU", "mIoU"} <= set(mixed["synthetic_refcoco_val"])
    assert mixed_rows == reasoned_rows + referring_rows
    assert {row["split"] for row in mixed_rows} == {SPLIT, "synthetic_refcoco_val"}


def test_predict_query_writes_the_answer_and_its_mask(
    tiny_checkpoint: Path,
    grounder: Grounder,
    compose_config: Callable[..., DictConfig],
    fixtures_dir: Path,
    tmp_path: Path,
) -> None:
    photo = fixtures_dir / PHOTO
    query = "the thing people stand on"
    overrides = [
        f"ckpt={tiny_checkpoint}",
        f"image={photo}",
        f"query={query}",
        f"generation.max_new_tokens={MAX_NEW_TOKENS}",
        "device=cpu",
        f"paths.output_dir={tmp_path}",
    ]
    overlay_path, json_path = predict(compose_config(overrides, config_name="predict"))

    result = grounder.segment(Image.open(photo), query, max_new_tokens=MAX_NEW_TOKENS)
    document = json.loads(json_path.read_text())
    assert document["query"] == query and document["answer"] == result.answer
    assert document["answer"].startswith("It is") and document["question"] == result.question
    rle = {"size": document["segmentation"]["size"], "counts": document["segmentation"]["counts"].encode()}
    assert np.array_equal(mask_utils.decode(rle).astype(bool), result.mask.numpy())
    assert document["area"] == int(result.mask.sum())
    assert document["bbox_xyxy"] == (None if result.box is None else list(result.box))
    with Image.open(photo) as image, Image.open(overlay_path) as overlay:
        assert overlay.format == "PNG" and overlay.size == image.size


@pytest.mark.parametrize(
    ("given", "word"), [(["phrases=a man", "query=who is playing"], "both"), ([], "neither")]
)
def test_predict_takes_exactly_one_of_phrases_and_query(
    given: list[str],
    word: str,
    compose_config: Callable[..., DictConfig],
    fixtures_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused before the model loads (the checkpoint does not exist), by ``predict`` and in one line by
    the CLI."""
    common = [f"ckpt={tmp_path / 'absent.ckpt'}", f"image={fixtures_dir / PHOTO}"]
    overrides = [*common, *given, f"paths.output_dir={tmp_path / 'out'}"]
    with pytest.raises(PredictInputError, match=f"exactly one of phrases=.* and query=.*; {word} given"):
        predict(compose_config(overrides, config_name="predict"))
    argv = ["predict", *common, *given, f"hydra.run.dir={tmp_path / 'run'}"]
    message = cli_exit(main, argv, monkeypatch)
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("predict: give exactly one of phrases") and f"{word} given" in message
