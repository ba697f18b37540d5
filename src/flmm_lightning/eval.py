"""Evaluate a checkpoint on every configured split: ``python -m flmm_lightning.eval ckpt=<path>``."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from flmm_lightning.builders import (
    build_datamodule,
    build_loggers,
    build_prompt_builder,
    module_from_checkpoint,
)
from flmm_lightning.callbacks import PerObjectRecorder
from flmm_lightning.config import CONF_DIR, register_resolvers
from flmm_lightning.reporting import print_metrics, write_metrics_json

register_resolvers()


def evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    L.seed_everything(cfg.seed, workers=True)
    module, stored = module_from_checkpoint(cfg.ckpt)
    data_cfg = cfg.data if cfg.get("data") is not None else stored.get("data")
    if data_cfg is None:
        raise ValueError(f"{cfg.ckpt} stores no data config: pass data=<name> (see conf/data/)")
    prompt_builder = build_prompt_builder(stored)
    datamodule = build_datamodule(data_cfg, prompt_builder, stored["sam"]["image_size"])
    if cfg.stage == "val":
        datamodule.test_sets = datamodule.val_sets
    recorder = PerObjectRecorder()
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=[recorder], logger=build_loggers(cfg.get("logger")) or False
    )
    trainer.test(module, datamodule=datamodule, verbose=False)
    results = dict(module.last_results)
    if trainer.is_global_zero:
        output_dir = Path(cfg.paths.output_dir)
        print_metrics(results, title=f"{Path(cfg.ckpt).name}: metrics (%)")
        write_metrics_json(results, output_dir / "metrics.json")
        write_per_object_csv(recorder.rows, output_dir / "per_object.csv")
        print(f"metrics.json and per_object.csv written to {output_dir}")
    return results


def write_per_object_csv(rows: list[dict[str, object]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["split", "image_id", "file_name", "object_id", "phrase", "iou", "box_iou"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    OmegaConf.set_struct(cfg, False)
    evaluate(cfg)


if __name__ == "__main__":
    main()
