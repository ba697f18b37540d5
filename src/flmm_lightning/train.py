"""Train an F-LMM mask head on a frozen LMM, then evaluate it.

``python -m flmm_lightning.train +experiment=<name> [overrides]``
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from flmm_lightning.boundaries import PromptBuilder
from flmm_lightning.builders import (
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_module,
    build_prompt_builder,
    check_resume,
    finish_wandb,
    output_dir_of,
    run_config,
    test_results,
)
from flmm_lightning.callbacks import HyperparameterLogger, MetricsJsonWriter, with_training_guards
from flmm_lightning.chat import write_turn
from flmm_lightning.config import CONF_DIR, register_resolvers
from flmm_lightning.data.datamodule import split_name
from flmm_lightning.metrics import ReferringSegmentationMetric
from flmm_lightning.model import FLMMModule
from flmm_lightning.narration import ground_what_you_say
from flmm_lightning.predict import Grounder
from flmm_lightning.pretrained import save_pretrained
from flmm_lightning.reporting import print_metrics, write_metrics_json
from flmm_lightning.run_dirs import claim_run_dir, mark_latest
from flmm_lightning.selection import every_word_baseline
from flmm_lightning.settings import check_choices

register_resolvers()


def whole_image_baseline(dataset: torch.utils.data.Dataset) -> dict[str, float]:
    """cIoU/mIoU of predicting the whole image for every object: the floor a trained model must beat."""
    metric = ReferringSegmentationMetric()
    for index in range(len(dataset)):
        masks = dataset[index].masks
        metric.update(torch.ones_like(masks), masks)
    computed = metric.compute()
    return {"cIoU": float(computed["cIoU"]), "mIoU": float(computed["mIoU"])}


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
    settings = cfg.reasonseg_after_fit
    datamodule = build_datamodule(settings.data, prompt_builder, cfg.sam.image_size)
    module.reasoning_settings = {"max_new_tokens": settings.max_new_tokens}
    trainer.test(module, datamodule=datamodule, weights_only=True, verbose=False)
    return test_results(module, metrics_path)


def train(cfg: DictConfig) -> dict[str, dict[str, float]]:
    check_choices(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = output_dir_of(cfg)
    ckpt_path = cfg.get("ckpt_path")
    claim_run_dir(output_dir, ckpt_path)
    stored = run_config(cfg)
    if ckpt_path:
        check_resume(ckpt_path, stored, cfg.paths)
    mark_latest(output_dir)
    metrics_path = output_dir / "metrics.json"
    prompt_builder = build_prompt_builder(cfg)
    datamodule = build_datamodule(cfg.data, prompt_builder, cfg.sam.image_size)
    module = build_module(cfg, stored_config=stored)
    run_test = bool(cfg.get("test_after_fit") and datamodule.test_names)
    run_reasoning = bool((cfg.get("reasonseg_after_fit") or {}).get("data"))
    callbacks = with_training_guards(
        [*build_callbacks(cfg.get("callbacks")), HyperparameterLogger.from_config(cfg)]
    )
    if run_test or run_reasoning:
        callbacks.append(MetricsJsonWriter(metrics_path))
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
    words_split = cfg.get("every_word_baseline_split")
    if words_split:
        narratives = datamodule.test_sets[split_name(words_split)]
        baseline = every_word_baseline(narratives[i].utterances for i in range(len(narratives)))
        results["baseline_every_word"] = {f"selector_{name}": value for name, value in baseline.items()}
    said_split = cfg.get("ground_what_you_say_split")
    if trainer.is_global_zero and said_split:
        grounder = Grounder(module.model, prompt_builder, cfg.sam.image_size)
        narratives = datamodule.test_sets[split_name(said_split)]
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
    baseline_split = cfg.get("whole_image_baseline_split")
    if baseline_split:
        results["baseline_whole_image"] = whole_image_baseline(
            datamodule.test_sets[split_name(baseline_split)]
        )
    if trainer.is_global_zero and results:
        print_metrics(results, title=f"{cfg.task_name}: test metrics (%)")
        path = write_metrics_json(results, metrics_path)
        print(f"metrics written to {path}")
    if trainer.is_global_zero and cfg.get("export_pretrained"):
        exported = save_pretrained(
            output_dir / "pretrained", module.model.trainable_state_dict(), stored, results
        )
        print(f"trained heads exported to {exported} (Grounder.from_pretrained, or ckpt=)")
    chat_split = (cfg.get("chat_after_fit") or {}).get("split")
    if trainer.is_global_zero and chat_split:
        chat_after_fit(module, prompt_builder, cfg, datamodule.test_sets[split_name(chat_split)], output_dir)
    finish_wandb(trainer)
    return results


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(cfg)


if __name__ == "__main__":
    main()
