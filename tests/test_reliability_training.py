"""Bad numbers and bad samples during training: skipped non-finite steps, skipped or fatal bad samples, and a
rank that fails under DDP."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_overrides
from hydra.utils import instantiate
from lightning import Callback, LightningModule, Trainer
from test_reliability_resume import FAST, QUIET, one_thread, run_module  # noqa: F401 - a fixture

from flmm_lightning.assets.synthetic_data import synthetic_paths, write_synthetic_dataset
from flmm_lightning.boundaries import SkippedSample
from flmm_lightning.data.refcoco import RefCocoDataset
from flmm_lightning.data.safe_pickle import load_refs
from flmm_lightning.data.sampler import TrainingSampler
from flmm_lightning.runs.build import build_datamodule, build_module, build_prompt_builder
from flmm_lightning.train import train
from flmm_lightning.training.callbacks import with_training_guards
from flmm_lightning.training.module import FLMMModule
from flmm_lightning.training.reliability import NonFiniteLossError

pytestmark = pytest.mark.usefixtures("one_thread")

# Only the RefCOCO-format training set: the PNG set shares its images, and a broken image would then be
# reported twice.
REFCOCO_ONLY = ["~data.train_sets.synthetic_png_train"]


# ---- non-finite loss -------------------------------------------------------------------------------------
class StepRecorder(Callback):
    """Per batch: its samples, whether the trainable weights changed, and AdamW's step count after it."""

    def __init__(self) -> None:
        self.samples: list[list[str]] = []
        self.weights_changed: list[bool] = []
        self.adam_steps: list[int] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int):
        self.samples.append([f"{s.image_id} ({s.file_name})" for s in batch.samples])
        self._before = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx):
        after = pl_module.state_dict()
        assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
        self.weights_changed.append(any(not torch.equal(self._before[k], v) for k, v in after.items()))
        states = trainer.optimizers[0].state.values()
        self.adam_steps.append(max((int(state["step"]) for state in states), default=0))


def fit_with_nan(compose_config, tmp_path: Path, nan_steps: set[int] | None, extra: list[str]):
    """Fits the demo model; a forward hook on the real U-Net turns its output into NaN at ``nan_steps``
    (None: always), which makes the loss NaN."""
    cfg = compose_config([*tiny_overrides(tmp_path / "data", tmp_path / "run"), *FAST, *QUIET, *extra])
    datamodule = build_datamodule(cfg.data, build_prompt_builder(cfg), cfg.sam.image_size)
    module: FLMMModule = build_module(cfg)

    def inject_nan(head: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if nan_steps is None or module.global_step in nan_steps:
            return output * float("nan")
        return None

    module.model.mask_head.register_forward_hook(inject_nan)
    recorder = StepRecorder()
    trainer: Trainer = instantiate(
        cfg.trainer,
        callbacks=with_training_guards([recorder]),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    return trainer, module, datamodule, recorder


def test_nonfinite_loss_skips_the_step_and_is_counted(compose_config, tmp_path: Path) -> None:
    trainer, module, datamodule, recorder = fit_with_nan(
        compose_config,
        tmp_path,
        nan_steps={1, 2},
        extra=["trainer.max_steps=4", "data.batch_size=2", "module.max_consecutive_nonfinite=3"],
    )
    trainer.fit(module, datamodule=datamodule)

    assert trainer.global_step == 4  # skipped steps count as steps: the schedule stays as planned
    assert recorder.weights_changed == [True, False, False, True]
    assert recorder.adam_steps == [1, 1, 1, 2]  # no moment or bias-correction update either
    assert float(trainer.callback_metrics["train/skipped_nonfinite_steps"]) == 2.0


def test_consecutive_nonfinite_losses_stop_the_run_naming_the_samples(compose_config, tmp_path: Path) -> None:
    trainer, module, datamodule, recorder = fit_with_nan(
        compose_config,
        tmp_path,
        nan_steps=None,
        extra=["trainer.max_steps=10", "data.batch_size=2", "module.max_consecutive_nonfinite=3"],
    )
    with pytest.raises(NonFiniteLossError) as error:
        trainer.fit(module, datamodule=datamodule)

    message = str(error.value)
    assert "3 consecutive training batches" in message and "max_consecutive_nonfinite=3" in message
    assert len(recorder.samples) == 3 and recorder.weights_changed == [False, False]
    for step, names in enumerate(recorder.samples):
        assert f"step {step} (rank 0): {', '.join(names)}" in message
    assert not any(p.grad is not None and not torch.isfinite(p.grad).all() for p in module.parameters())


# ---- bad samples -----------------------------------------------------------------------------------------
def broken_synthetic_data(data_dir: Path) -> dict[str, tuple[str, str]]:
    """The demo's synthetic set with three broken training images: reason -> (sample id, file in error)."""
    paths = write_synthetic_dataset(data_dir / "synthetic", num_train=12, num_val=6)
    instances = json.loads(paths.refcoco_instances.read_text())
    train_refs = [ref for ref in load_refs(paths.refcoco_refs) if ref["split"] == "train"]
    image_ids = list(dict.fromkeys(ref["image_id"] for ref in train_refs))[:3]
    images = {image["id"]: image for image in instances["images"]}
    missing, truncated, empty = (paths.image_dir / images[i]["file_name"] for i in image_ids)

    missing.unlink()
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    emptied = next(ref["ann_id"] for ref in train_refs if ref["image_id"] == image_ids[2])
    annotation = next(a for a in instances["annotations"] if a["id"] == emptied)
    height, width = images[image_ids[2]]["height"], images[image_ids[2]]["width"]
    annotation["segmentation"] = {"size": [height, width], "counts": [height * width]}  # RLE, all zeros
    paths.refcoco_instances.write_text(json.dumps(instances))
    return {
        "missing file": (f"image_id={image_ids[0]}", str(missing)),
        "unreadable image": (f"image_id={image_ids[1]}", str(truncated)),
        "empty mask": (f"image_id={image_ids[2]}", str(paths.refcoco_instances)),
    }


def bad_sample_overrides(tmp_path: Path, workers: int) -> list[str]:
    return [
        *tiny_overrides(tmp_path / "data", tmp_path / "run"),
        f"paths.output_dir={tmp_path / 'run'}",  # no Hydra run outside the CLI
        *FAST,
        *QUIET,
        *REFCOCO_ONLY,
        f"data.num_workers={workers}",
        "data.batch_size=4",
        "trainer.max_steps=-1",
        "trainer.max_epochs=1",
        "callbacks=none",
    ]


def test_skip_mode_trains_an_epoch_and_reports_exactly_the_bad_samples(
    compose_config, tmp_path: Path, capsys
) -> None:
    broken = broken_synthetic_data(tmp_path / "data")
    cfg = compose_config(
        [
            *bad_sample_overrides(tmp_path, workers=0),
            "+data.train_sets.synthetic_refcoco_train.on_bad_sample=skip",
        ]
    )
    train(cfg)

    output = capsys.readouterr().out
    table = output[output.index("skipped samples (on_bad_sample=skip):") :].splitlines()
    rows = [line.split() for line in table if line.startswith("refcoco_synthetic")]
    assert sorted((row[1:-2], row[-1]) for row in rows) == sorted(
        (reason.split(), path) for reason, (_, path) in broken.items()
    )
    assert all(row[-2] == "1" for row in rows)
    assert next(line for line in table if line.startswith("total")).split() == ["total", "3"]


def test_default_mode_stops_at_the_first_bad_sample_naming_its_file(compose_config, tmp_path: Path) -> None:
    broken = broken_synthetic_data(tmp_path / "data")
    # The training order is a function of the seed and the epoch, so the first broken sample read is known.
    paths = synthetic_paths(tmp_path / "data" / "synthetic")
    skipping = RefCocoDataset(**paths.refcoco_kwargs("train"), on_bad_sample="skip")
    in_order = (skipping[key.index] for key in TrainingSampler(len(skipping), seed=0))
    first = next(item for item in in_order if isinstance(item, SkippedSample))

    cfg = compose_config(bad_sample_overrides(tmp_path, workers=1))  # read in a dataloader worker
    with pytest.raises(RuntimeError) as error:  # the worker's BadSampleError, re-raised by the DataLoader
        train(cfg)
    message = str(error.value)
    assert "BadSampleError" in message
    assert f"sample {first.sample_id}: {first.reason}" in message and f"(file: {first.path})" in message
    assert sum(f"(file: {path})" in message for _, path in broken.values()) == 1


# ---- DDP: a failing rank -------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_rank_that_raises_brings_the_run_down_with_its_error(tmp_path: Path) -> None:
    """Two gloo processes (ddp_spawn); the first sample rank 1 reads has a truncated image. The run must end
    with rank 1's error, not hang with rank 0 waiting in a collective."""
    paths = write_synthetic_dataset(tmp_path / "data" / "synthetic", num_train=12, num_val=6)
    dataset = RefCocoDataset(**paths.refcoco_kwargs("train"))
    rank1_first = next(iter(TrainingSampler(len(dataset), seed=0, num_replicas=2, rank=1))).index
    rank0 = {key.index for key in TrainingSampler(len(dataset), seed=0, num_replicas=2, rank=0)}
    assert rank1_first not in rank0  # one sample per image: rank 0 never reads the broken file
    image = paths.image_dir / dataset[rank1_first].file_name
    image.write_bytes(image.read_bytes()[:200])

    result = run_module(
        "flmm_lightning.train",
        [
            *tiny_overrides(tmp_path / "data", tmp_path / "run"),
            *FAST,
            *QUIET,
            *REFCOCO_ONLY,
            "trainer=ddp_cpu",
            "data.batch_size=1",
            "trainer.max_steps=4",
            "callbacks=none",
        ],
        timeout=300,
    )
    assert result.returncode not in (0, -signal.SIGKILL)
    assert "process 1 terminated with the following error" in result.stderr.lower(), result.stderr[-3000:]
    assert f"(file: {image})" in result.stderr and "unreadable image" in result.stderr


class NaNOnRank(Callback):
    """Under DDP: NaN from the real U-Net on one rank at the given steps (a forward hook). Every rank writes
    to ``<out_dir>/rank<r>.json``, per step, whether its trainable weights changed and their fingerprint."""

    def __init__(self, rank: int, steps: list[int], out_dir: str) -> None:
        self.rank = rank
        self.steps = set(steps)
        self.out_dir = Path(out_dir)
        self.records: list[tuple[bool, str]] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        def inject_nan(head: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            if trainer.global_rank == self.rank and trainer.global_step in self.steps:
                return output * float("nan")
            return None

        pl_module.model.mask_head.register_forward_hook(inject_nan)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int):
        self._before = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx):
        after = pl_module.state_dict()
        changed = any(not torch.equal(self._before[k], v) for k, v in after.items())
        fingerprint = hashlib.sha256(b"".join(v.cpu().numpy().tobytes() for v in after.values())).hexdigest()
        self.records.append((changed, fingerprint))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.records))


@pytest.mark.slow
def test_ddp_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path) -> None:
    """Rank 1's loss is NaN at step 1: both ranks skip that step (no hang, no rank updating alone) and the
    weights stay identical across ranks."""
    result = run_module(
        "flmm_lightning.train",
        [
            *tiny_overrides(tmp_path / "data", tmp_path / "run"),
            *FAST,
            *QUIET,
            "trainer=ddp_cpu",
            "data.batch_size=2",
            "trainer.max_steps=3",
            "callbacks=none",
            "+callbacks.nan._target_=test_reliability_training.NaNOnRank",
            "+callbacks.nan.rank=1",
            "+callbacks.nan.steps=[1]",
            f"+callbacks.nan.out_dir={tmp_path / 'records'}",
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / "records" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [changed for changed, _ in records[0]] == [True, False, True]
    assert records[0] == records[1]
