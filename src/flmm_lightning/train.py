"""Train an F-LMM mask head on a frozen LMM, then evaluate it.

``python -m flmm_lightning.train +experiment=<name> [overrides]``
"""

from __future__ import annotations

import hydra
import lightning as L
from omegaconf import DictConfig

from flmm_lightning.config.composition import register_resolvers
from flmm_lightning.config.settings import check_choices
from flmm_lightning.runs.after_fit import (
    FittedRun,
    drop_unresolvable_reasonseg_data,
    run_after_fit,
    tests_after_fit,
)
from flmm_lightning.runs.build import (
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_module,
    build_prompt_builder,
    output_dir_of,
    run_config,
)
from flmm_lightning.runs.checkpoints import check_init_from, check_resume, initialize_from
from flmm_lightning.runs.folders import claim_run_dir, mark_latest
from flmm_lightning.runs.task import task_wrapper
from flmm_lightning.training.callbacks import (
    HyperparameterLogger,
    MetricsJsonWriter,
    StoredConfigWriter,
    with_training_guards,
)
from flmm_lightning.training.feature_cache import FeatureCacheWriter, open_feature_cache

register_resolvers()


@task_wrapper("train")
def train(cfg: DictConfig) -> dict[str, dict[str, float]]:
    check_choices(cfg)
    drop_unresolvable_reasonseg_data(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = output_dir_of(cfg)
    ckpt_path = cfg.get("ckpt_path")
    claim_run_dir(output_dir, ckpt_path)
    stored = run_config(cfg)
    if ckpt_path:
        check_resume(ckpt_path, stored, cfg.paths)
    init_from = (
        check_init_from(cfg.init_from, stored, cfg.paths) if cfg.get("init_from") and not ckpt_path else None
    )
    mark_latest(output_dir)
    prompt_builder = build_prompt_builder(cfg)
    datamodule = build_datamodule(cfg.data, prompt_builder, cfg.sam.image_size)
    module = build_module(cfg)
    if init_from:
        initialize_from(module, init_from)
        print(f"fine-tuning from the weights of {init_from}")
    feature_store = open_feature_cache(module, datamodule, cfg.trainer.get("precision"))
    callbacks = with_training_guards(
        [
            *build_callbacks(cfg.get("callbacks")),
            HyperparameterLogger.from_config(cfg),
            StoredConfigWriter(stored),
        ]
    )
    if tests_after_fit(cfg, datamodule):
        callbacks.append(MetricsJsonWriter(output_dir / "metrics.json"))
    if feature_store is not None:
        callbacks.append(FeatureCacheWriter(feature_store))
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=build_loggers(cfg.get("logger")) or False
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return run_after_fit(FittedRun(cfg, trainer, module, datamodule, prompt_builder, stored, output_dir))


main = train.main

if __name__ == "__main__":
    main()
