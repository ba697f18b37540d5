"""Evaluate a checkpoint on every configured split: ``python -m flmm_lightning.eval ckpt=<path>``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from flmm_lightning.config.composition import register_resolvers
from flmm_lightning.config.errors import ConfigError
from flmm_lightning.config.settings import (
    check_choices,
    chosen_checkpoint_groups,
    generation_settings,
    refuse_checkpoint_groups,
)
from flmm_lightning.config.stored import paths_read
from flmm_lightning.data.datamodule import GroundingDataModule
from flmm_lightning.outputs.reporting import (
    print_metrics,
    read_per_object_csv,
    write_metrics_json,
    write_per_object_csv,
)
from flmm_lightning.runs.build import (
    MODEL_KEYS,
    build_datamodule,
    build_loggers,
    output_dir_of,
    test_results,
)
from flmm_lightning.runs.checkpoints import module_from_checkpoint
from flmm_lightning.runs.folders import claim_run_dir, mark_latest
from flmm_lightning.runs.task import task_wrapper
from flmm_lightning.training.callbacks import (
    BadSampleReport,
    HyperparameterLogger,
    MetricsJsonWriter,
    PerObjectRecorder,
)
from flmm_lightning.training.evaluation import SplitEvaluation
from flmm_lightning.training.feature_cache import FeatureCacheWriter, open_feature_cache
from flmm_lightning.training.module import FLMMModule
from flmm_lightning.training.reasoning_eval import ReasoningEvaluator

register_resolvers()


def evaluators(
    module: FLMMModule, datamodule: GroundingDataModule, reasonseg_settings: dict[str, Any]
) -> list[tuple[SplitEvaluation, GroundingDataModule]]:
    """Each evaluating module with the test splits it scores: ``module`` the grounding splits, a
    ``ReasoningEvaluator`` of its core with ``reasonseg_settings`` the reasoning splits."""
    answered = [name for name in datamodule.test_names if datamodule.is_reasoning(name)]
    if not answered:
        return [(module, datamodule)]
    reasoner = ReasoningEvaluator(
        module.model, datamodule.prompt_builder, datamodule.sam_image_size, **reasonseg_settings
    )
    grounded = [name for name in datamodule.test_names if name not in answered]
    runs = [(module, datamodule.with_test_sets(grounded))] if grounded else []
    return [*runs, (reasoner, datamodule.with_test_sets(answered))]


def score_every_split(
    trainer: L.Trainer,
    runs: list[tuple[SplitEvaluation, GroundingDataModule]],
    splits: list[str],
    output_dir: Path,
) -> dict[str, dict[str, float]]:
    """The test loop of each of ``runs``; the metrics of every split, in the order of ``splits``. Each loop's
    callbacks write its own splits to metrics.json and per_object.csv; after several loops global rank 0
    writes both files again with every split."""
    metrics_path, rows_path = output_dir / "metrics.json", output_dir / "per_object.csv"
    results: dict[str, dict[str, float]] = {}
    rows: list[dict[str, str]] = []
    for module, datamodule in runs:
        trainer.test(module, datamodule=datamodule, verbose=False)
        results.update(test_results(module, metrics_path))
        if len(runs) > 1 and trainer.is_global_zero:
            rows += read_per_object_csv(rows_path)
    results = {split: results[split] for split in splits if split in results}
    if len(runs) > 1 and trainer.is_global_zero:
        write_metrics_json(results, metrics_path)
        write_per_object_csv(sorted(rows, key=lambda row: splits.index(row["split"])), rows_path)
    return results


@task_wrapper("eval", checkpoint_groups=True)
def evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    refuse_checkpoint_groups(chosen_checkpoint_groups(cfg), "eval")
    check_choices(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = output_dir_of(cfg)
    claim_run_dir(output_dir)
    mark_latest(output_dir)
    # data=<name> (a whole data config: it names its _target_) replaces the stored one; the command line's
    # other keys of stored sections (++data.eval_batch_size=8, ++model.pretrained=<dir>) patch them.
    data_chosen = cfg.get("data") is not None and "_target_" in cfg.data
    patched = [key for key in (*MODEL_KEYS, "data") if cfg.get(key) is not None]
    overrides = {key: cfg[key] for key in patched if not (key == "data" and data_chosen)}
    loaded = module_from_checkpoint(cfg.ckpt, paths=cfg.paths, overrides=overrides)
    module, config, prompt_builder = loaded.module, loaded.config, loaded.prompt_builder
    data_cfg = cfg.data if data_chosen else config.get("data")
    if data_cfg is None:
        raise ValueError(f"{cfg.ckpt} stores no data config: pass data=<name> (see conf/data/)")
    try:
        datamodule = build_datamodule(data_cfg, prompt_builder, config.sam.image_size)
    except ConfigError as error:
        read = [] if data_chosen else paths_read(loaded.stored.get("data"))
        if not read:
            raise
        here = ", ".join(f"{key} = {OmegaConf.select(config, key)}" for key in read)
        raise ConfigError(
            f"{error}\n{cfg.ckpt} stores its data config relative to {here} on this machine: set "
            f"{read[0]}=<the folder that holds the data>, or choose data=<name>"
        ) from error
    reasoning = cfg.get("reasonseg")
    # eval.reasonseg.* and generation.* (the latter wins where both set a key)
    reasonseg_settings = {
        **(OmegaConf.to_container(reasoning, resolve=True) if reasoning else {}),
        **generation_settings(cfg),
    }
    if cfg.stage == "val":
        datamodule.test_sets = datamodule.val_sets
    # Both files are written by global rank 0 of the processes that run the test loop (workers under
    # ddp_spawn), the per-object rows gathered from every rank.
    metrics_path = output_dir / "metrics.json"
    callbacks = [
        PerObjectRecorder(output_dir / "per_object.csv"),
        MetricsJsonWriter(metrics_path),
        HyperparameterLogger.from_config(cfg, config),
        BadSampleReport(),
    ]
    feature_store = open_feature_cache(module, datamodule, cfg.trainer.get("precision"))
    if feature_store is not None:
        callbacks.append(FeatureCacheWriter(feature_store))
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=build_loggers(cfg.get("logger")) or False
    )
    runs = evaluators(module, datamodule, reasonseg_settings)
    results = score_every_split(trainer, runs, datamodule.test_names, output_dir)
    if trainer.is_global_zero:
        print_metrics(results, title=f"{Path(cfg.ckpt).name}: metrics (%)")
        print(f"metrics.json and per_object.csv written to {output_dir}")
    return results


main = evaluate.main

if __name__ == "__main__":
    main()
