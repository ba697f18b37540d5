"""The work after fitting, task by task: each reads a setting of ``conf/train.yaml``, adds nothing where that
setting is off or names a split the run's data lacks, and ``test_after_fit=false`` leaves only the export."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
from omegaconf import DictConfig, OmegaConf

from flmm_lightning.data.datamodule import GroundingDataModule
from flmm_lightning.runs.after_fit import (
    AFTER_FIT,
    ChatTurn,
    EveryWordBaseline,
    FittedRun,
    GroundWhatYouSay,
    WholeImageBaseline,
    run_after_fit,
)
from flmm_lightning.runs.build import build_module, build_prompt_builder, run_config
from flmm_lightning.training.module import FLMMModule

pytestmark = pytest.mark.usefixtures("pinned_threads")

SPLIT_TASKS = [EveryWordBaseline(), GroundWhatYouSay(), WholeImageBaseline(), ChatTurn()]


@pytest.fixture(scope="module")
def tiny_module(tiny_config: DictConfig) -> FLMMModule:
    return build_module(tiny_config)


def fitted_run(cfg: DictConfig, module: FLMMModule, output_dir: Path) -> FittedRun:
    """The tiny model, untrained, as after a fit on data without test splits."""
    prompt_builder = build_prompt_builder(cfg)
    datamodule = GroundingDataModule(prompt_builder, cfg.sam.image_size)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    return FittedRun(cfg, trainer, module, datamodule, prompt_builder, run_config(cfg), output_dir)


def with_settings(cfg: DictConfig, settings: dict[str, object]) -> DictConfig:
    changed = cfg.copy()
    for key, value in settings.items():
        OmegaConf.update(changed, key, value)
    return changed


def test_every_task_reads_a_setting_of_the_train_config(compose_config: Callable[..., DictConfig]) -> None:
    cfg = compose_config([])
    names = [task.name for task in AFTER_FIT]
    assert len(set(names)) == len(names)
    for task in AFTER_FIT:
        if task.setting is not None:
            assert OmegaConf.select(cfg, task.setting, default="absent") != "absent", task.name


def test_tasks_whose_settings_are_off_add_nothing_and_write_nothing(
    tiny_config: DictConfig, tiny_module: FLMMModule, tmp_path: Path
) -> None:
    """Every extra off, no test split, no ReasonSeg data: each task (the report included) adds nothing."""
    off = {task.setting: None for task in AFTER_FIT if task.setting not in (None, "test_after_fit")}
    cfg = with_settings(tiny_config, {**off, "export_pretrained": False})
    fitted = fitted_run(cfg, tiny_module, tmp_path)
    for task in AFTER_FIT:
        assert task.run(fitted) is None, task.name
    assert run_after_fit(fitted) == {}
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("task", SPLIT_TASKS, ids=[task.name for task in SPLIT_TASKS])
def test_a_task_on_a_split_the_data_lacks_is_skipped_with_a_message(
    task, tiny_config: DictConfig, tiny_module: FLMMModule, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fitted = fitted_run(with_settings(tiny_config, {task.setting: "nope"}), tiny_module, tmp_path)
    with caplog.at_level(logging.WARNING, logger="flmm_lightning.runs.after_fit"):
        assert task.run(fitted) is None
    assert (
        f"{task.setting}=nope: this run's data has no such test split (its test splits: none)" in caplog.text
    )
    assert list(tmp_path.iterdir()) == []


def test_test_after_fit_false_leaves_only_the_export(
    tiny_config: DictConfig, tiny_module: FLMMModule, tmp_path: Path
) -> None:
    """The demo's extras all set: none runs, the export (which that switch never governed) does."""
    cfg = with_settings(tiny_config, {"test_after_fit": False, "export_pretrained": True})
    assert cfg.chat_after_fit.split and cfg.whole_image_baseline_split and cfg.reasonseg_after_fit.data
    assert run_after_fit(fitted_run(cfg, tiny_module, tmp_path)) == {}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pretrained"]
    assert (tmp_path / "pretrained" / "model.safetensors").is_file()
