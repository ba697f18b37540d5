"""A checkpoint moves between machines: it stores the model's identity and settings, and the machine that
loads it supplies its own paths (data, SAM weights, asset cache) from its config and command line."""

from __future__ import annotations

import csv
import math
import pickle
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_exit import cli_exit
from conftest import tiny_overrides
from omegaconf import DictConfig

from flmm_lightning.assets import TINY_QWEN2_5_VL, TINY_SAM, ensure_tiny_sam
from flmm_lightning.assets.sam import TINY_SAM_FILE
from flmm_lightning.assets.synthetic_data import REFCOCO_DATASET, REFCOCO_SPLIT_BY, write_synthetic_dataset
from flmm_lightning.config.composition import config_on_this_machine
from flmm_lightning.config.errors import ConfigError
from flmm_lightning.config.stored import UnsafeConfigError
from flmm_lightning.core import CheckpointMismatchError
from flmm_lightning.eval import evaluate
from flmm_lightning.eval import main as eval_main
from flmm_lightning.runs.build import build_module, run_config
from flmm_lightning.runs.checkpoints import check_resume, load_checkpoint, module_from_checkpoint
from flmm_lightning.train import train

STEPS = 3
NUM_TRAIN, NUM_VAL, NUM_VAL_ELSEWHERE = 12, 6, 9


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def val_image_ids(synthetic_root: Path) -> set[str]:
    """The images of the val split, from the RefCOCO-format annotation file itself."""
    refs = pickle.loads((synthetic_root / REFCOCO_DATASET / f"refs({REFCOCO_SPLIT_BY}).p").read_bytes())
    return {str(ref["image_id"]) for ref in refs if ref["split"] == "val"}


def assert_identical(actual: dict[str, dict[str, float]], expected: dict[str, dict[str, float]]) -> None:
    assert actual.keys() == expected.keys()
    for split, values in expected.items():
        assert actual[split].keys() == values.keys(), split
        for name, value in values.items():
            other = actual[split][name]
            assert (math.isnan(value) and math.isnan(other)) or other == value, f"{split}/{name}"


@pytest.mark.slow
def test_moved_checkpoint_evaluates_this_machines_data_with_rebuilt_assets(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """Train with data in A and assets in B; move the checkpoint, delete A and B; evaluate with data in D
    (another dataset: more val images) and the assets rebuilt in C."""
    data_a, cache_b, run_dir = tmp_path / "A", tmp_path / "B", tmp_path / "run"
    overrides = [
        *tiny_overrides(data_a, run_dir),
        f"paths.output_dir={run_dir}",
        f"paths.cache_dir={cache_b}",
        f"trainer.max_steps={STEPS}",
        f"callbacks.model_checkpoint.every_n_train_steps={STEPS}",
        "callbacks.mask_overlays=null",
        "test_after_fit=false",
        "whole_image_baseline_split=null",
    ]
    train(compose_config(overrides))
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    stored = load_checkpoint(checkpoint)["flmm_config"]
    assert not [text for text in strings(stored) if str(tmp_path) in text]
    assert stored["sam"]["refiner"]["sam"]["checkpoint"] == f"${{paths.cache_dir}}/{TINY_SAM}/{TINY_SAM_FILE}"
    trained_val_images = val_image_ids(data_a / "synthetic")
    assert len(trained_val_images) == NUM_VAL

    data_d = tmp_path / "D"
    write_synthetic_dataset(data_d / "synthetic", num_train=NUM_TRAIN, num_val=NUM_VAL_ELSEWHERE)
    here = [f"paths.data_dir={data_d}", f"++data.synthetic.num_val={NUM_VAL_ELSEWHERE}"]

    def evaluate_in(folder: Path, ckpt: Path, cache: Path) -> dict[str, dict[str, float]]:
        cfg = compose_config(
            [f"ckpt={ckpt}", *here, f"paths.cache_dir={cache}", f"paths.output_dir={folder}"],
            config_name="eval",
        )
        return evaluate(cfg)

    before_the_move = evaluate_in(tmp_path / "eval_before", checkpoint, cache_b)

    moved = tmp_path / "elsewhere" / "model.ckpt"
    moved.parent.mkdir()
    shutil.move(checkpoint, moved)
    for folder in (data_a, cache_b, run_dir):
        shutil.rmtree(folder)
    cache_c = tmp_path / "C"
    results = evaluate_in(tmp_path / "eval_moved", moved, cache_c)

    assert_identical(results, before_the_move)  # the same model: same weights, the same assets rebuilt
    assert not data_a.exists() and not cache_b.exists()
    assert (cache_c / TINY_QWEN2_5_VL).is_dir() and (cache_c / TINY_SAM / TINY_SAM_FILE).is_file()
    with (tmp_path / "eval_moved" / "per_object.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "synthetic_refcoco_val"]
    evaluated = {row["image_id"] for row in rows}
    assert evaluated == val_image_ids(data_d / "synthetic")
    assert len(evaluated) == NUM_VAL_ELSEWHERE != len(trained_val_images)


@pytest.fixture
def sam_weights_config(compose_config: Callable[..., DictConfig], tmp_path: Path) -> DictConfig:
    """The demo with its SAM weights read from ``paths.checkpoint_dir``, as the real SAM configs do."""
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(ensure_tiny_sam(tmp_path / "assets"), weights / "sam_tiny.pth")
    return compose_config(
        [
            *tiny_overrides(tmp_path / "data", tmp_path / "run"),
            f"paths.checkpoint_dir={weights}",
            "sam.refiner.sam.checkpoint=${paths.checkpoint_dir}/sam_tiny.pth",
        ]
    )


def save_untrained(cfg: DictConfig, path: Path) -> Path:
    module = build_module(cfg)
    torch.save({"state_dict": module.state_dict(), "flmm_config": run_config(cfg)}, path)
    return path


def test_missing_sam_weights_name_the_key_the_path_and_the_override(
    sam_weights_config: DictConfig, tmp_path: Path
) -> None:
    checkpoint = save_untrained(sam_weights_config, tmp_path / "model.ckpt")
    stored = load_checkpoint(checkpoint)["flmm_config"]
    assert stored["sam"]["refiner"]["sam"]["checkpoint"] == "${paths.checkpoint_dir}/sam_tiny.pth"

    paths = dict(sam_weights_config.paths)
    elsewhere = tmp_path / "no_weights_here"
    with pytest.raises(FileNotFoundError) as error:
        module_from_checkpoint(checkpoint, paths={**paths, "checkpoint_dir": str(elsewhere)})
    message = str(error.value)
    assert f"sam.refiner.sam.checkpoint = {elsewhere / 'sam_tiny.pth'} does not exist" in message
    assert "set paths.checkpoint_dir=" in message and str(checkpoint) in message

    config = module_from_checkpoint(checkpoint, paths=paths).config
    assert config.sam.refiner.sam.checkpoint == str(tmp_path / "weights" / "sam_tiny.pth")


def test_missing_data_of_a_stored_data_config_names_the_paths_key(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    demo = [o for o in tiny_overrides(tmp_path / "data", tmp_path / "run") if not o.startswith("data.")]
    cfg = compose_config([*demo, "data=refcoco"])
    checkpoint = save_untrained(cfg, tmp_path / "model.ckpt")
    empty = tmp_path / "empty"
    eval_cfg = compose_config(
        [f"ckpt={checkpoint}", f"paths.data_dir={empty}", f"paths.output_dir={tmp_path / 'eval'}"],
        config_name="eval",
    )
    with pytest.raises(ConfigError) as error:
        evaluate(eval_cfg)
    message = str(error.value)
    assert message.startswith("data.")
    assert str(empty / "coco") in message and f"paths.data_dir = {empty}" in message
    assert "set paths.data_dir=" in message


def test_stored_config_keeps_path_placeholders_and_resolves_everything_else(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = compose_config(
        [
            *tiny_overrides(tmp_path / "data", tmp_path / "run"),
            "sam.refiner.embedding_cache=${paths.cache_dir}/sam_embeddings",
            "+model.prompt.instruction=${task_name}",
        ]
    )
    stored = run_config(cfg)
    # the SAM cache is this machine's choice: a checkpoint never names a folder to write to (config.stored)
    assert stored["sam"]["refiner"]["embedding_cache"] is None
    assert stored["model"]["prompt"]["instruction"] == "demo"  # every interpolation resolved now
    assert stored["model"]["lmm"]["text_proj_dim"] == cfg.sam.embed_dim
    assert stored["data"]["test_sets"] == stored["data"]["val_sets"]
    assert stored["data"]["synthetic"]["root"] == "${paths.data_dir}/synthetic"  # but paths: placeholders

    here = {"cache_dir": str(tmp_path / "here"), "data_dir": str(tmp_path / "data_here")}
    config = config_on_this_machine(stored, here, {"data": {"eval_batch_size": 3}})
    assert config.data.synthetic.root == str(tmp_path / "data_here" / "synthetic")
    assert config.model.lmm.pretrained == str(tmp_path / "here" / TINY_QWEN2_5_VL)
    assert config.data.eval_batch_size == 3 and config.data.batch_size == cfg.data.batch_size


def test_a_run_whose_checkpoints_could_not_be_loaded_stops_before_training(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = compose_config([*tiny_overrides(tmp_path / "data", tmp_path / "run"), "+model.local_copy=/models"])
    with pytest.raises(UnsafeConfigError, match=r"flmm_config\.model\.local_copy: a key the schema lacks"):
        run_config(cfg)


@pytest.mark.parametrize(
    ("key", "value"),
    [("pretrained", "${oc.env:HOME}/models"), ("pretrained", "${trainer.default_root_dir}"), ("name", "${")],
)
def test_checkpoint_config_reading_outside_its_sections_is_refused(
    tiny_config: DictConfig, key: str, value: str
) -> None:
    stored = run_config(tiny_config)
    stored["model"][key] = value
    with pytest.raises(UnsafeConfigError, match=rf"^x\.ckpt: refusing [^\n]*\n  flmm_config\.model\.{key}: "):
        config_on_this_machine(stored, {}, source="x.ckpt")


def test_resume_compares_the_pretrained_weights_as_resolved_here(
    tiny_config: DictConfig, tmp_path: Path
) -> None:
    """The checkpoint names its LMM under a placeholder (``${paths.checkpoint_dir}/<name>``); a resume that
    spells the same folder out continues it, one that names another folder is refused."""
    stored = run_config(tiny_config)
    stored["model"]["pretrained"] = f"${{paths.checkpoint_dir}}/{tiny_config.model.name}"
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "flmm_config": stored}, checkpoint)
    weights = tmp_path / "weights"
    here = {"checkpoint_dir": str(weights), "cache_dir": str(tmp_path / "cache"), "data_dir": str(tmp_path)}

    def run_with(pretrained: Path) -> dict[str, Any]:
        return {**stored, "model": {**stored["model"], "pretrained": str(pretrained)}}

    check_resume(checkpoint, run_with(weights / tiny_config.model.name), here)
    mismatch = rf"model\.pretrained: '{tiny_config.model.name}' in the checkpoint, 'other' in this run"
    with pytest.raises(CheckpointMismatchError, match=mismatch):
        check_resume(checkpoint, run_with(weights / "other"), here)


def test_a_tiny_sam_checkpoint_from_before_the_move_to_assets_loads_and_builds_its_assets(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """Checkpoints written while ``heads/`` built the tiny SAM store ``build_sam`` with ``name: tiny``."""
    cfg = compose_config(tiny_overrides(tmp_path / "data", tmp_path / "run"))
    checkpoint = save_untrained(cfg, tmp_path / "model.ckpt")
    saved = load_checkpoint(checkpoint)
    written = saved["flmm_config"]["sam"]["refiner"]["sam"]
    assert written["_target_"] == "flmm_lightning.assets.sam.build_tiny_sam"
    saved["flmm_config"]["sam"]["refiner"]["sam"] = {
        "_target_": "flmm_lightning.heads.sam_refiner.build_sam",
        "name": "tiny",
        "checkpoint": written["checkpoint"],
    }
    legacy = tmp_path / "legacy.ckpt"  # not over the loaded file: its tensors are mapped from it
    torch.save(saved, legacy)

    empty_cache = tmp_path / "empty_cache"
    loaded = module_from_checkpoint(legacy, paths={**cfg.paths, "cache_dir": str(empty_cache)})
    module, config = loaded.module, loaded.config
    assert config.sam.refiner.sam.checkpoint == str(empty_cache / TINY_SAM / TINY_SAM_FILE)
    assert loaded.stored["sam"]["refiner"]["sam"] == written  # what a checkpoint of it will store
    assert (empty_cache / TINY_SAM / TINY_SAM_FILE).is_file() and (empty_cache / TINY_QWEN2_5_VL).is_dir()
    for key, value in saved["state_dict"].items():
        assert torch.equal(module.state_dict()[key], value), key


def test_eval_command_line_names_a_misspelled_key_of_its_stored_data_config_patch(
    compose_config: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m flmm_lightning.eval ckpt=... ++data.<key>=...`` (Hydra's main, in process, struct mode on):
    a key the data schema does not declare stops the run, named, before any data is read."""
    cfg = compose_config(tiny_overrides(tmp_path / "data", tmp_path / "run"))
    checkpoint = save_untrained(cfg, tmp_path / "model.ckpt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # as a user's shell has it (`make` sets 1): message, exit
    here = [f"hydra.run.dir={tmp_path / 'eval'}", f"paths.data_dir={tmp_path / 'data'}"]
    message = cli_exit(
        eval_main, ["eval", f"ckpt={checkpoint}", *here, "++data.eval_batch_sise=2"], monkeypatch
    )
    # the one line a shell shows (SystemExit's message goes to stderr), no traceback
    assert str(message).startswith("error: data.eval_batch_sise is not a key of a data config")
    assert not (tmp_path / "data").exists()
