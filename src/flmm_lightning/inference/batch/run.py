"""``python -m flmm_lightning.predict ckpt=<path> inputs=<manifest> [output=<folder>] [trainer=ddp]``: every
input of a manifest grounded through ``trainer.predict``, resumably, on one device or many."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
from lightning import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from flmm_lightning.config.settings import (
    CHECKPOINT_GROUPS,
    chosen_checkpoint_groups,
    generation_settings,
    refuse_checkpoint_groups,
)
from flmm_lightning.data.images import ImageLimits
from flmm_lightning.inference.batch.dataset import BatchPredictionData
from flmm_lightning.inference.batch.manifest import ManifestError, read_manifest
from flmm_lightning.inference.batch.output import PredictionOutput, PredictionWriter
from flmm_lightning.inference.batch.predictor import BatchPredictor
from flmm_lightning.inference.batch.progress import ImagesProgressBar
from flmm_lightning.runs.checkpoints import load_model

SUMMARY = "summary.json"


@dataclass
class BatchSummary:
    """How a batch run went; ``processed`` inputs (their lines written by this run) in ``seconds``."""

    inputs: int  # in the manifest
    done: int  # with a prediction line in the output, this run's and earlier runs'
    failed: int  # with an error line
    processed: int
    seconds: float
    output: str

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"inputs {self.inputs} · done {self.done} · failed {self.failed} · this run {self.processed} in "
            f"{self.seconds:.1f} s ({self.images_per_s:.2f} images/s)\npredictions: {self.output}"
        )


def output_folder(cfg: DictConfig) -> Path:
    """``output=``, else ``outputs/predict_batch/<manifest name>`` under the working directory: the same
    command finds the same folder, and resumes."""
    if cfg.get("output"):
        return Path(cfg.output)
    return Path(cfg.paths.root_dir) / "outputs" / "predict_batch" / Path(cfg.inputs).stem


def predict_batch(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> BatchSummary:
    """Grounds every input of ``cfg.inputs`` not yet in the output folder and writes one line per input
    (``callbacks``: more Lightning callbacks for the prediction loop). Global rank 0 returns the summary of
    the whole output; other ranks that of what they know."""
    refuse_checkpoint_groups(chosen_checkpoint_groups(cfg), "predict")
    if "image" in cfg and not OmegaConf.is_missing(cfg, "image"):
        raise ManifestError("give image=<file> (one image) or inputs=<manifest> (batch mode), not both")
    settings = cfg.batch
    phrases = cfg.get("phrases")
    if OmegaConf.is_config(phrases):
        phrases = OmegaConf.to_container(phrases)
    if phrases is not None:
        # one phrase as a plain string; numbers a config parsed (phrases=[1984]) as their text
        phrases = [str(p) for p in phrases] if isinstance(phrases, list) else [str(phrases)]
    entries = read_manifest(
        cfg.inputs,
        phrases=phrases,
        query=cfg.get("query"),
        image_dir=settings.get("image_dir"),
    )
    output = PredictionOutput(output_folder(cfg), {entry.id: entry.index for entry in entries})
    if rank_zero_only.rank == 0:
        output.claim({"ckpt": str(Path(cfg.ckpt).resolve()), "inputs": str(Path(cfg.inputs).resolve())})
    done_before = output.completed_ids()
    patches = {key: cfg[key] for key in CHECKPOINT_GROUPS if cfg.get(key) is not None}
    loaded = load_model(cfg.ckpt, paths=cfg.paths, overrides=patches)
    config, prompt_builder = loaded.config, loaded.prompt_builder
    predictor = BatchPredictor(
        loaded.core, prompt_builder, config.sam.image_size, settings.overlays, generation_settings(cfg)
    )
    data = BatchPredictionData(
        entries,
        output,
        prompt_builder,
        config.sam.image_size,
        settings.size,
        settings.num_workers,
        ImageLimits.from_config(cfg.get("image_limits") or {}),
    )
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=[PredictionWriter(output), ImagesProgressBar(), *callbacks],
        logger=False,
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    trainer.predict(predictor, datamodule=data, return_predictions=False)
    seconds = time.perf_counter() - start
    # Under torchrun every rank returns here: rank 0 folds the shards once all have written theirs.
    trainer.strategy.barrier("batch_predict.end")
    lines = output.consolidate() if rank_zero_only.rank == 0 else output.lines()
    known = [lines[entry.id] for entry in entries if entry.id in lines]
    failed = sum(1 for line in known if line.failed)
    summary = BatchSummary(
        inputs=len(entries),
        done=len(known) - failed,
        failed=failed,
        processed=sum(1 for entry in entries if entry.id not in done_before and entry.id in lines),
        seconds=seconds,
        output=str(output.predictions),
    )
    if rank_zero_only.rank == 0:
        (output.folder / SUMMARY).write_text(
            json.dumps({**asdict(summary), "images_per_s": summary.images_per_s}, indent=2) + "\n"
        )
        print(summary)
    return summary
