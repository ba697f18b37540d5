"""The wrapper every entry point runs in: W&B closed even when the task raises, the environment set, the
output folder logged, a configuration error on the command line ended in one line."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import wandb
from cli_exit import cli_exit
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from flmm_lightning import train as train_entry
from flmm_lightning.runs.task import task_wrapper


def test_the_wandb_run_is_closed_when_the_task_raises(tmp_path: Path) -> None:
    @task_wrapper("train")
    def failing(cfg: DictConfig) -> None:
        logger = WandbLogger(save_dir=str(tmp_path), offline=True)
        logger.log_metrics({"loss": 1.0})
        assert wandb.run is not None
        raise RuntimeError("the task failed")

    with pytest.raises(RuntimeError, match="the task failed"):
        failing(OmegaConf.create({"paths": {"output_dir": str(tmp_path)}}))
    assert wandb.run is None
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run.glob("run-*.wandb"))


def test_the_task_runs_with_the_entry_points_environment_and_logs_its_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)

    @task_wrapper("eval")
    def reads_environment(cfg: DictConfig, extra: int) -> tuple[str | None, int]:
        return os.environ.get("TOKENIZERS_PARALLELISM"), extra

    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})
    with caplog.at_level(logging.INFO, logger="flmm_lightning.runs.task"):
        assert reads_environment(cfg, 3) == ("false", 3)
    assert f"eval: output in {tmp_path}" in caplog.text


def test_a_configuration_error_in_the_task_ends_the_command_line_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A typo found inside train (``check_choices``) used to end in Hydra's traceback."""
    argv = ["train", f"hydra.run.dir={tmp_path / 'run'}", "model.lmm.capture=fuse"]
    message = str(cli_exit(train_entry.main, argv, monkeypatch))
    assert message.startswith("error: unknown value: model.lmm.capture='fuse': must be one of")
    assert "\n" not in message


@pytest.mark.parametrize("setting", ["chat_after_fit.max_new_tokens", "reasonseg_after_fit.max_new_tokens"])
def test_train_refuses_the_earlier_generation_length_keys(
    setting: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    argv = ["train", f"hydra.run.dir={tmp_path / 'run'}", f"{setting}=16"]
    message = str(cli_exit(train_entry.main, argv, monkeypatch))
    assert message == (
        f"error: train: `{setting}=16`: {setting} is now generation.max_new_tokens; "
        "write generation.max_new_tokens=16"
    )
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run folder
