"""Command-line use beyond a single run: Hydra sweeps, their hyper-parameters in the loggers, the progress bar
of a run trained by steps."""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from lightning import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from omegaconf import DictConfig

from flmm_lightning.runs.checkpoints import load_checkpoint
from flmm_lightning.train import main as train_main
from flmm_lightning.training.callbacks import StepAwareProgressBar

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_sweep_dir_resolves_before_hydra_config_is_set(
    compose_config: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multirun launcher builds ``hydra.sweep.dir`` before any job runs, when Hydra's ``${hydra:...}``
    resolver has no config to read yet."""
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["+experiment=demo"])
    HydraConfig.instance().cfg = None
    sweep_dir = Path(str(cfg.hydra.sweep.dir))
    assert sweep_dir.parent == tmp_path / "multirun" / "demo"
    started = datetime.strptime(sweep_dir.name, "%Y-%m-%d_%H-%M-%S")
    assert abs((datetime.now() - started).total_seconds()) < 600


@pytest.mark.slow
def test_two_job_sweep_trains_both_and_logs_their_hyperparameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m flmm_lightning.train -m ... module.optimizer.lr=1e-3,1e-4`` (Hydra's main, in process): one
    directory per job, each with its checkpoint and an ``hparams.yaml`` that tells the jobs apart."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    argv = [
        "train",
        "-m",
        "+experiment=demo",
        f"paths.data_dir={tmp_path / 'data'}",
        "data.synthetic.num_train=4",
        "data.synthetic.num_val=2",
        "data.num_workers=0",
        "logger=csv",
        "trainer.max_steps=1",
        "trainer.limit_val_batches=0",
        "test_after_fit=false",
        "whole_image_baseline_split=null",
        "module.optimizer.lr=1e-3,1e-4",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        train_main()
    finally:
        torch.set_num_threads(threads)

    (sweep_dir,) = (tmp_path / "multirun" / "demo").iterdir()
    learning_rates = []
    for job in ("0", "1"):
        job_dir = sweep_dir / job
        assert load_checkpoint(job_dir / "checkpoints" / "last.ckpt")["global_step"] == 1
        (hparams_file,) = (job_dir / "csv").glob("version_*/hparams.yaml")
        hparams = yaml.safe_load(hparams_file.read_text())
        assert {"model", "sam", "data", "module", "trainer"} <= set(hparams)
        assert hparams["trainer"]["max_steps"] == 1
        assert hparams["paths"]["output_dir"] == str(job_dir)
        learning_rates.append(hparams["module"]["optimizer"]["lr"])
    assert learning_rates == [1e-3, 1e-4]


def rendered_progress(max_epochs: int, max_steps: int) -> str:
    """The text the training progress bar writes to a terminal for a short fit."""
    terminal = io.StringIO()
    bar = StepAwareProgressBar(console_kwargs={"file": terminal, "force_terminal": True, "width": 160})
    trainer = Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        limit_train_batches=2,
        limit_val_batches=0,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(BoringModel())
    return terminal.getvalue()


def test_progress_bar_of_a_run_trained_by_steps_names_its_step_budget() -> None:
    text = rendered_progress(max_epochs=-1, max_steps=3)
    assert "/-2" not in text
    assert "Epoch 1 · max_steps 3" in text  # 2 batches per epoch: the third step is in the second epoch


def test_progress_bar_of_a_run_trained_by_epochs_counts_epochs() -> None:
    text = rendered_progress(max_epochs=2, max_steps=-1)
    # Which epoch's frame reaches the terminal last depends on rich's refresh thread (a loaded machine may
    # skip the last one); every frame counts epochs out of the last one.
    assert re.search(r"Epoch [01]/1", text) and "max_steps" not in text and "/-" not in text
