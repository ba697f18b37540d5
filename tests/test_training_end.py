"""How a training run ends: its last step is in ``last.ckpt`` whatever the checkpoint cadence, a full disk is
an error that says how much room is missing, and the after-training extras follow ``test_after_fit`` and the
run's own data."""

from __future__ import annotations

import errno
import io
import logging
import resource
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from test_reliability_resume import FAST, QUIET

from flmm_lightning.runs.after_fit import drop_unresolvable_reasonseg_data
from flmm_lightning.runs.checkpoints import load_checkpoint
from flmm_lightning.train import train
from flmm_lightning.training.reliability import AtomicCheckpointIO, CheckpointSpaceError

pytestmark = pytest.mark.usefixtures("pinned_threads")


def run_overrides(tmp_path: Path) -> list[str]:
    """The demo experiment on a small synthetic dataset, its run folder ``tmp_path/run``."""
    return [*tiny_overrides(tmp_path / "data", tmp_path / "run"), f"paths.output_dir={tmp_path / 'run'}"]


def test_last_step_is_saved_when_max_steps_falls_between_checkpoints(compose_config, tmp_path: Path) -> None:
    cfg = compose_config(
        [
            *run_overrides(tmp_path),
            *FAST,
            *QUIET,
            "trainer.max_steps=6",
            "callbacks.model_checkpoint.every_n_train_steps=4",
        ]
    )
    train(cfg)
    folder = tmp_path / "run" / "checkpoints"
    assert load_checkpoint(folder / "last.ckpt")["global_step"] == 6
    assert load_checkpoint(folder / "step_000004.ckpt")["global_step"] == 4  # the cadence is unchanged


def test_full_disk_names_the_folder_the_bytes_needed_and_free(tmp_path: Path) -> None:
    """A write that runs out of room (here a file-size limit, EFBIG: Python ignores SIGXFSZ)."""
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"weights": torch.arange(10.0)}, target)
    old_bytes = target.read_bytes()
    checkpoint = {"weights": torch.ones(1 << 20)}
    expected = io.BytesIO()
    torch.save(checkpoint, expected)

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
    try:
        with pytest.raises(CheckpointSpaceError) as info:
            AtomicCheckpointIO().save_checkpoint(checkpoint, target)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)

    message = str(info.value)
    assert info.value.errno == errno.EFBIG
    assert str(target.parent) in message
    assert f"needs {len(expected.getvalue()):,} bytes" in message
    free = shutil.disk_usage(target.parent).free
    reported_free = int(message.split(" bytes are free")[0].rsplit(" ", 1)[1].replace(",", ""))
    assert abs(reported_free - free) < 1 << 30  # the same disk, give or take what others wrote meanwhile
    assert target.read_bytes() == old_bytes
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_test_after_fit_false_runs_no_extra(compose_config, tmp_path: Path) -> None:
    cfg = compose_config([*run_overrides(tmp_path), *FAST, *QUIET[:2], "trainer.max_steps=1"])
    assert cfg.chat_after_fit.split and cfg.whole_image_baseline_split and cfg.reasonseg_after_fit.data
    assert train(cfg) == {}
    run = tmp_path / "run"
    assert not (run / "metrics.json").exists() and not (run / "chat").exists()


def test_extras_on_splits_the_data_lacks_are_skipped_with_a_message(
    compose_config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An experiment that extends demo with data of its own: demo's extras name splits it has not."""
    cfg = compose_config(
        [
            *run_overrides(tmp_path),
            *FAST,
            "trainer.limit_val_batches=0",
            "trainer.max_steps=1",
            "data.test_sets={mine: ${data.val_sets.synthetic_refcoco_val}}",
            "reasonseg_after_fit.data=null",
        ]
    )
    with caplog.at_level(logging.WARNING, logger="flmm_lightning.runs.after_fit"):
        results = train(cfg)
    assert set(results) == {"mine"}
    for setting in ("every_word_baseline_split", "ground_what_you_say_split", "chat_after_fit.split"):
        assert f"{setting}=synthetic_png_val: this run's data has no such test split" in caplog.text
    assert "whole_image_baseline_split=synthetic_refcoco_val" in caplog.text
    assert "(its test splits: mine)" in caplog.text


def test_reasonseg_data_that_refers_to_missing_settings_is_dropped(compose_config, tmp_path: Path) -> None:
    cfg = compose_config(["+experiment=demo", "data=png", f"paths.data_dir={tmp_path}"])
    assert cfg.reasonseg_after_fit.data is not None
    drop_unresolvable_reasonseg_data(cfg)
    assert cfg.reasonseg_after_fit.data is None
