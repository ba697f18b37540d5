"""Crashes mid-training: atomic checkpoint files, and a SIGKILLed run that resumes to the same weights."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from lightning import Callback, LightningModule, Trainer

from flmm_lightning.training.reliability import AtomicCheckpointIO

TESTS_DIR = Path(__file__).parent

# Subprocess settings: offline, and one intra-op thread (on a shared 2-core VM several threads per process
# made a CPU step ~7x slower); the malloc settings are the Makefile's (CPU steps ~20x slower without them).
RUN_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "HYDRA_FULL_ERROR": "1",
    "OMP_NUM_THREADS": "1",
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "536870912",
}

# A small U-Net keeps a CPU step well under a second; everything else is the demo experiment.
FAST = ["module.mask_head.base_channels=16", "module.mask_head.upsample_to=32"]
# Training only: no validation, no test after fitting.
QUIET = ["trainer.limit_val_batches=0", "test_after_fit=false", "whole_image_baseline_split=null"]


@pytest.fixture
def one_thread():
    """One intra-op thread for in-process training (see RUN_ENV)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_env() -> dict[str, str]:
    python_path = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **RUN_ENV, "PYTHONPATH": python_path}


def run_module(module: str, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---- atomic checkpoint files -----------------------------------------------------------------------------
# The child saves a 4 MiB checkpoint over ``target`` under a 1 MiB file-size limit, with SIGXFSZ at its
# default action: the kernel kills the process when the write reaches 1 MiB.
SAVE_KILLED_MID_WRITE = textwrap.dedent(
    """
    import resource, signal, sys, torch
    from flmm_lightning.training.reliability import AtomicCheckpointIO
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(1 << 20)}, sys.argv[1])
    """
)


def write_old_checkpoint(target: Path) -> bytes:
    AtomicCheckpointIO().save_checkpoint({"weights": torch.arange(10.0)}, target)
    return target.read_bytes()


def assert_old_checkpoint_intact(target: Path, old_bytes: bytes) -> None:
    assert target.read_bytes() == old_bytes
    assert torch.equal(torch.load(target, weights_only=True)["weights"], torch.arange(10.0))
    # The next save replaces the target and any leftover partial file.
    AtomicCheckpointIO().save_checkpoint({"weights": torch.zeros(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["weights"], torch.zeros(3))
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_checkpoint_write_killed_midway_leaves_the_old_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "checkpoints" / "last.ckpt"
    old_bytes = write_old_checkpoint(target)
    result = subprocess.run(
        [sys.executable, "-c", SAVE_KILLED_MID_WRITE, str(target)],
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == -signal.SIGXFSZ, result.stderr
    assert target.with_name(".last.ckpt.tmp").stat().st_size == 1 << 20  # killed in the middle of writing
    assert_old_checkpoint_intact(target, old_bytes)


def test_checkpoint_write_failing_midway_leaves_the_old_file_intact(tmp_path: Path) -> None:
    """A write error (full disk; here a file-size limit, EFBIG: Python ignores SIGXFSZ) mid-way."""
    target = tmp_path / "checkpoints" / "last.ckpt"
    old_bytes = write_old_checkpoint(target)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))
    try:
        # torch.save reports it as a RuntimeError raised while handling the OSError.
        with pytest.raises((OSError, RuntimeError)) as info:
            AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(1 << 20)}, target)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    chain = [info.value, info.value.__context__]
    assert any(isinstance(error, OSError) and error.errno == errno.EFBIG for error in chain), chain
    assert not target.with_name(".last.ckpt.tmp").exists()  # removed on error
    assert_old_checkpoint_intact(target, old_bytes)


def test_trainer_config_uses_the_atomic_checkpoint_io(tiny_config) -> None:
    from hydra.utils import instantiate

    trainer: Trainer = instantiate(tiny_config.trainer, logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ---- kill and resume -------------------------------------------------------------------------------------
class SigkillAtStep(Callback):
    """Kills its own process with SIGKILL (no cleanup of any kind) at the start of the optimizer step that
    follows global step ``step``: after that step's checkpoint was written, with the next batch's forward
    and backward already done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def trainable_state(checkpoint_path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    return checkpoint["global_step"], checkpoint["state_dict"]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    """24 training samples in batches of 4: 6 steps per epoch, 9 steps in all, a checkpoint every 3 steps.

    The interrupted run is killed after the checkpoint of step 3 (mid-epoch: the dataloader's position rides
    in the checkpoint) and, resumed, again after that of step 6 (the end of epoch 0); resumed once more it
    finishes at step 9. It uses 2 dataloader workers, the uninterrupted run none: the data a step sees is a
    function of (seed, epoch, index) alone (shuffle order, RefCOCO's random sentence)."""

    def overrides(run_dir: Path, workers: int) -> list[str]:
        return [
            *tiny_overrides(tmp_path / "data", run_dir),
            *FAST,
            f"data.num_workers={workers}",
            "data.batch_size=4",
            "trainer.max_steps=9",
            "trainer.deterministic=true",
            "trainer.limit_val_batches=0",
            "callbacks.model_checkpoint.every_n_train_steps=3",
            "test_after_fit=false",
            "whole_image_baseline_split=null",
        ]

    def killer(step: int) -> list[str]:
        return [
            "+callbacks.sigkill._target_=test_reliability_resume.SigkillAtStep",
            f"+callbacks.sigkill.step={step}",
        ]

    def train(args: list[str]) -> subprocess.CompletedProcess[str]:
        return run_module("flmm_lightning.train", args, timeout=600)

    straight = train(overrides(tmp_path / "straight", workers=0))
    assert straight.returncode == 0, straight.stderr[-3000:]

    runs = [tmp_path / "run_a", tmp_path / "run_b", tmp_path / "run_c"]
    # The killed runs' dataloader workers must die with them: orphans would keep the output pipes open and
    # this call would wait until its timeout.
    first = train([*overrides(runs[0], workers=2), *killer(3)])
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert trainable_state(runs[0] / "checkpoints" / "last.ckpt")[0] == 3

    second = train([*overrides(runs[1], 2), *killer(6), f"ckpt_path={runs[0] / 'checkpoints' / 'last.ckpt'}"])
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    assert trainable_state(runs[1] / "checkpoints" / "last.ckpt")[0] == 6

    third = train([*overrides(runs[2], 2), f"ckpt_path={runs[1] / 'checkpoints' / 'last.ckpt'}"])
    assert third.returncode == 0, third.stderr[-3000:]
    # With a plain DataLoader Lightning would warn and replay the epoch from its first batch.
    assert "dataloader is not resumable" not in second.stderr + third.stderr

    expected_step, expected = trainable_state(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    step, resumed = trainable_state(runs[2] / "checkpoints" / "last.ckpt")
    assert expected_step == step == 9
    assert expected.keys() == resumed.keys()
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)
    # Training did move the weights (the comparison is not between two untouched initialisations).
    _, at_three = trainable_state(runs[0] / "checkpoints" / "last.ckpt")
    assert any(not torch.equal(at_three[key], expected[key]) for key in expected)
