"""Train an F-LMM mask head on a frozen LMM, then evaluate it.

``python -m flmm_lightning.train +experiment=<name> [overrides]``
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError
from torch.utils.data import Dataset

from flmm_lightning.boundaries import PromptBuilder
from flmm_lightning.chat import write_turn
from flmm_lightning.config.composition import CONF_DIR, register_resolvers
from flmm_lightning.config.settings import check_choices
from flmm_lightning.data.datamodule import GroundingDataModule, split_name
from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.inference.narration import ground_what_you_say
from flmm_lightning.metrics import ReferringSegmentationMetric
from flmm_lightning.outputs.reporting import print_metrics, write_metrics_json
from flmm_lightning.runs.build import (
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_module,
    build_prompt_builder,
    finish_wandb,
    output_dir_of,
    run_config,
    test_results,
)
from flmm_lightning.runs.checkpoints import check_init_from, check_resume, initialize_from
from flmm_lightning.runs.folders import claim_run_dir, mark_latest
from flmm_lightning.runs.pretrained import save_pretrained
from flmm_lightning.selection import every_word_baseline
from flmm_lightning.training.callbacks import HyperparameterLogger, MetricsJsonWriter, with_training_guards
from flmm_lightning.training.feature_cache import FeatureCacheWriter, open_feature_cache
from flmm_lightning.training.module import FLMMModule

register_resolvers()
log = logging.getLogger(__name__)


def whole_image_baseline(dataset: torch.utils.data.Dataset) -> dict[str, float]:
    """cIoU/mIoU of predicting the whole image for every object: the floor a trained model must beat."""
    metric = ReferringSegmentationMetric()
    for index in range(len(dataset)):
        masks = dataset[index].masks
        metric.update(torch.ones_like(masks), masks)
    computed = metric.compute()
    return {"cIoU": float(computed["cIoU"]), "mIoU": float(computed["mIoU"])}


def after_fit_split(datamodule: GroundingDataModule, setting: str, key: str | None) -> Dataset | None:
    """The test split named by an after-training extra's ``setting`` (e.g. ``chat_after_fit.split``); None,
    with a message, where the setting is empty or this run's data has no such test split (an experiment that
    extends ``demo`` with its own data keeps demo's split names)."""
    if not key:
        return None
    name = split_name(key)
    if name not in datamodule.test_sets:
        splits = ", ".join(datamodule.test_names) or "none"
        log.warning(
            "%s=%s: this run's data has no such test split (its test splits: %s); skipped",
            setting,
            key,
            splits,
        )
        return None
    return datamodule.test_sets[name]


def drop_unresolvable_reasonseg_data(cfg: DictConfig) -> None:
    """Sets ``reasonseg_after_fit.data`` to null, with a message, when it refers to a setting this run's
    config lacks (demo's refers to ``data.synthetic``, which an experiment on one's own data has not)."""
    data = OmegaConf.select(cfg, "reasonseg_after_fit.data")
    if data is None:
        return
    try:
        OmegaConf.to_container(data, resolve=True)
    except InterpolationResolutionError as error:
        log.warning("reasonseg_after_fit.data: %s; skipped", str(error).splitlines()[0])
        cfg.reasonseg_after_fit.data = None


def chat_after_fit(
    module: FLMMModule, prompt_builder: PromptBuilder, cfg: DictConfig, dataset: Dataset, output_dir: Path
) -> None:
    """One grounded chat turn about the first image of ``dataset`` (``cfg.chat_after_fit``), its overlay and
    JSON written to ``<run>/chat/``: the trained model's conversation path, end to end."""
    settings = cfg.chat_after_fit
    grounder = Grounder(module.model, prompt_builder, cfg.sam.image_size)
    turn = grounder.chat(dataset[0].image, settings.question, max_new_tokens=settings.max_new_tokens)
    chat_dir = output_dir / "chat"
    chat_dir.mkdir(parents=True, exist_ok=True)
    overlay_path, json_path = write_turn(turn, chat_dir, 1)
    print(f"chat: {settings.question!r} -> {turn.answer!r} ({len(turn.phrases)} phrases): {overlay_path}")


def reasonseg_after_fit(
    trainer: L.Trainer, module: FLMMModule, prompt_builder: PromptBuilder, cfg: DictConfig, metrics_path: Path
) -> dict[str, dict[str, float]]:
    """The test loop over ``cfg.reasonseg_after_fit.data``'s splits: reasoning segmentation, each query
    answered by the trained model's frozen LMM inside the test step (as ``eval data=reasonseg`` does)."""
    from flmm_lightning.training.reasoning_eval import ReasoningEvaluator

    settings = cfg.reasonseg_after_fit
    datamodule = build_datamodule(settings.data, prompt_builder, cfg.sam.image_size)
    evaluator = ReasoningEvaluator(
        module.model, prompt_builder, cfg.sam.image_size, max_new_tokens=settings.max_new_tokens
    )
    trainer.test(evaluator, datamodule=datamodule, weights_only=True, verbose=False)
    return test_results(evaluator, metrics_path)


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
    metrics_path = output_dir / "metrics.json"
    prompt_builder = build_prompt_builder(cfg)
    datamodule = build_datamodule(cfg.data, prompt_builder, cfg.sam.image_size)
    module = build_module(cfg, stored_config=stored)
    if init_from:
        initialize_from(module, init_from)
        print(f"fine-tuning from the weights of {init_from}")
    feature_store = open_feature_cache(module, datamodule, cfg.trainer.get("precision"))
    # test_after_fit=false: neither the test nor any of the after-training extras
    after_fit = bool(cfg.get("test_after_fit"))
    run_test = after_fit and bool(datamodule.test_names)
    run_reasoning = after_fit and OmegaConf.select(cfg, "reasonseg_after_fit.data") is not None
    callbacks = with_training_guards(
        [*build_callbacks(cfg.get("callbacks")), HyperparameterLogger.from_config(cfg)]
    )
    if run_test or run_reasoning:
        callbacks.append(MetricsJsonWriter(metrics_path))
    if feature_store is not None:
        callbacks.append(FeatureCacheWriter(feature_store))
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=build_loggers(cfg.get("logger")) or False
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    results: dict[str, dict[str, float]] = {}
    if run_test:
        trainer.test(module, datamodule=datamodule, weights_only=True, verbose=False)
        results = test_results(module, metrics_path)
    if run_reasoning:
        results.update(reasonseg_after_fit(trainer, module, prompt_builder, cfg, metrics_path))
    if not after_fit:
        log.info("test_after_fit=false: no test and no after-training extras")

    def extra(setting: str) -> Dataset | None:
        return after_fit_split(datamodule, setting, OmegaConf.select(cfg, setting)) if after_fit else None

    narratives = extra("every_word_baseline_split")
    if narratives is not None:
        baseline = every_word_baseline(narratives[i].utterances for i in range(len(narratives)))
        results["baseline_every_word"] = {f"selector_{name}": value for name, value in baseline.items()}
    narratives = extra("ground_what_you_say_split")
    if trainer.is_global_zero and narratives is not None:
        grounder = Grounder(module.model, prompt_builder, cfg.sam.image_size)
        said = ground_what_you_say(grounder, map(narratives.__getitem__, range(len(narratives))))
        results["ground_what_you_say"] = said
        for logger in trainer.loggers:
            logger.log_metrics(
                {
                    f"ground_what_you_say/{name}": value
                    for name, value in said.items()
                    if not math.isnan(value)
                },
                step=trainer.global_step,
            )
    whole_images = extra("whole_image_baseline_split")
    if whole_images is not None:
        results["baseline_whole_image"] = whole_image_baseline(whole_images)
    if trainer.is_global_zero and results:
        print_metrics(results, title=f"{cfg.task_name}: test metrics (%)")
        path = write_metrics_json(results, metrics_path)
        print(f"metrics written to {path}")
    if trainer.is_global_zero and cfg.get("export_pretrained"):
        exported = save_pretrained(
            output_dir / "pretrained", module.model.trainable_state_dict(), stored, results
        )
        print(f"trained heads exported to {exported} (Grounder.from_pretrained, or ckpt=)")
    chat_images = extra("chat_after_fit.split")
    if trainer.is_global_zero and chat_images is not None:
        chat_after_fit(module, prompt_builder, cfg, chat_images, output_dir)
    finish_wandb(trainer)
    return results


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(cfg)


if __name__ == "__main__":
    main()
