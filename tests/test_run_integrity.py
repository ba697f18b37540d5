"""What a path says is what it holds: a re-run gets a folder of its own (``latest`` names the newest), a
resume keeps ``last.ckpt`` the newest state through any number of interruptions, Ctrl-C / SIGTERM save a
resumable checkpoint, and a resume refuses a checkpoint of another model."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lightning import Callback, LightningModule, Trainer
from omegaconf import DictConfig
from test_entrypoints import run_overrides
from test_reliability_resume import FAST, QUIET, one_thread, run_env, run_module  # noqa: F401 - a fixture

from flmm_lightning.core import CheckpointMismatchError
from flmm_lightning.runs.checkpoints import load_checkpoint
from flmm_lightning.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

# A checkpoint after every step; only ModelCheckpoint and the interrupt checkpoint write anything.
EVERY_STEP = [
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "callbacks.mask_overlays=null",
    "callbacks.rich_progress_bar=null",
]


def global_step(path: Path) -> int:
    return load_checkpoint(path)["global_step"]


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(path.name for path in (run_dir / "checkpoints").glob("*.ckpt"))


# ---- resume ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resuming_in_the_run_folder_keeps_last_ckpt_the_newest_through_two_interruptions(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """Train to step 2, resume to 4, resume to 6, each time from ``<run>/checkpoints/last.ckpt`` into the
    run's own folder (what the docs say). The resumed runs checkpoint at another interval: Lightning then
    restores nothing of ``ModelCheckpoint``'s state (it is keyed by its settings), and without
    ``enable_version_counter: false`` it would write ``last-v1.ckpt`` next to the old ``last.ckpt``."""
    run_dir, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    for steps, interval in ((2, 1), (4, 2), (6, 1)):
        resume = [f"ckpt_path={last}"] if steps > 2 else []
        overrides = run_overrides(tmp_path / "data", run_dir, *FAST, *QUIET, *EVERY_STEP, *resume)
        every = f"callbacks.model_checkpoint.every_n_train_steps={interval}"
        train(compose_config([*overrides, every, f"trainer.max_steps={steps}"]))
        assert global_step(last) == steps
        names = checkpoint_names(run_dir)
        assert f"step_{steps:06d}.ckpt" in names and not [name for name in names if name.startswith("last-")]
    assert (tmp_path / "latest").resolve() == run_dir.resolve()


def test_resume_refuses_a_checkpoint_of_another_lmm_with_the_same_shapes(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """The tiny Qwen2.5-VL and Qwen3-VL both have 4 layers x 4 heads and hidden size 64: every trainable
    tensor has the same shape, so only the stored identity tells them apart."""
    first = tmp_path / "qwen2_5"
    base = [*FAST, *QUIET, *EVERY_STEP, "trainer.max_steps=1"]
    train(compose_config(run_overrides(tmp_path / "data", first, *base)))
    checkpoint = first / "checkpoints" / "last.ckpt"
    resumed = tmp_path / "qwen3"
    other_model = ["model=tiny_qwen3_vl", f"ckpt_path={checkpoint}", "trainer.max_steps=2"]
    overrides = run_overrides(tmp_path / "data", resumed, *base, *other_model)
    with pytest.raises(CheckpointMismatchError) as error:
        train(compose_config(overrides))
    message = str(error.value)
    assert "flmm_lightning.lmm.qwen2_vl.Qwen2VLAdapter" in message
    assert "flmm_lightning.lmm.qwen3_vl.Qwen3VLAdapter" in message
    assert "'tiny_qwen2_5_vl' in the checkpoint, 'tiny_qwen3_vl' in this run" in message
    assert not (resumed / "checkpoints").exists()


# ---- a fresh folder per run ------------------------------------------------------------------------------
def cli_train(cwd: Path, data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``python -m flmm_lightning.train +experiment=demo`` (as ``make demo``) in ``cwd``, for one step."""
    args = [
        "+experiment=demo",
        f"paths.data_dir={data_dir}",
        "data.synthetic.num_train=12",
        "data.synthetic.num_val=6",
        "data.num_workers=0",
        "logger=csv",
        "trainer.max_steps=1",
        *FAST,
        *QUIET,
        *EVERY_STEP,
        *extra,
    ]
    return subprocess.run(
        [sys.executable, "-m", "flmm_lightning.train", *args],
        cwd=cwd,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_rerunning_the_demo_writes_a_new_folder_and_never_touches_the_old_one(tmp_path: Path) -> None:
    first = cli_train(tmp_path, tmp_path / "data")
    assert first.returncode == 0, first.stderr[-3000:]
    demo = tmp_path / "outputs" / "demo"
    (first_run,) = [path for path in demo.iterdir() if path.name != "latest"]
    first_files = {path: path.read_bytes() for path in first_run.rglob("*") if path.is_file()}
    assert (demo / "latest").resolve() == first_run

    time.sleep(1.1)  # the folder name is the start time, to the second
    second = cli_train(tmp_path, tmp_path / "data")
    assert second.returncode == 0, second.stderr[-3000:]
    runs = sorted(path for path in demo.iterdir() if path.name != "latest")
    assert len(runs) == 2 and runs[0] == first_run
    assert (demo / "latest").resolve() == runs[1]
    assert checkpoint_names(runs[1]) == ["last.ckpt", "step_000001.ckpt"]
    assert {path: path.read_bytes() for path in first_run.rglob("*") if path.is_file()} == first_files

    # A fixed folder that holds a run: refused before Hydra writes its config copy into it.
    third = cli_train(tmp_path, tmp_path / "data", f"hydra.run.dir={first_run}")
    assert third.returncode != 0
    assert f"{first_run} holds the files of another run" in third.stderr
    assert {path: path.read_bytes() for path in first_run.rglob("*") if path.is_file()} == first_files


# ---- Ctrl-C and SIGTERM ----------------------------------------------------------------------------------
class PauseAtStep(Callback):
    """At the start of the batch after global step ``step``: creates ``<folder>/paused`` and waits until
    ``<folder>/go`` exists, so that the test's signal arrives in the middle of a known batch."""

    def __init__(self, step: int, folder: str) -> None:
        self.step = step
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int):
        if trainer.global_step == self.step:
            (self.folder / "paused").touch()
            deadline = time.monotonic() + 300
            while not (self.folder / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_saves_a_checkpoint_that_resumes(
    signum: signal.Signals, compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """Checkpoints every 3 steps; the signal comes during the 4th step: the run saves step 4 and stops,
    and a resume from ``last.ckpt`` in the same folder trains on to step 6."""
    run_dir, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    periodic = [
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "callbacks.mask_overlays=null",
        "callbacks.rich_progress_bar=null",
    ]
    overrides = run_overrides(tmp_path / "data", run_dir, *FAST, *QUIET, *periodic)
    pause = [
        "+callbacks.pause._target_=test_run_integrity.PauseAtStep",
        "+callbacks.pause.step=3",
        f"+callbacks.pause.folder={tmp_path}",
    ]
    command = [sys.executable, "-m", "flmm_lightning.train", *overrides, "trainer.max_steps=100", *pause]
    output_options = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    child = subprocess.Popen(command, env=run_env(), **output_options)
    try:
        deadline = time.monotonic() + 600
        while not (tmp_path / "paused").exists():
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()[0][-3000:]
            time.sleep(0.05)
        child.send_signal(signum)
        (tmp_path / "go").touch()
        output, _ = child.communicate(timeout=300)
    finally:
        child.kill()
    assert child.returncode == (1 if signum == signal.SIGINT else 0), output[-3000:]
    assert f"interrupted at step 4: saved {last}" in output
    assert checkpoint_names(run_dir) == ["last.ckpt", "step_000003.ckpt"]
    assert global_step(last) == 4 > global_step(run_dir / "checkpoints" / "step_000003.ckpt")

    resumed = [*overrides, f"ckpt_path={last}", "trainer.max_steps=6"]
    train(compose_config(resumed))
    assert global_step(last) == 6
    assert checkpoint_names(run_dir) == ["last.ckpt", "step_000006.ckpt"]
