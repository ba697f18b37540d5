"""What a training run does after fitting, each piece a task of its own: the test loop, ReasonSeg, the
baselines, ground what you say, the metrics report, the pretrained export and one chat turn.

Each task has a name, the setting it reads and ``run(fitted)``, which returns its entries for
``metrics.json`` (None where it adds none). ``run_after_fit`` runs them in ``AFTER_FIT``'s order; with
``test_after_fit=false`` only the export runs (that switch never governed it).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError
from torch.utils.data import Dataset

from flmm_lightning.boundaries import PromptBuilder
from flmm_lightning.config.settings import generation_settings
from flmm_lightning.data.datamodule import GroundingDataModule, split_name
from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.inference.narration import ground_what_you_say
from flmm_lightning.metrics import ReferringSegmentationMetric
from flmm_lightning.outputs.reporting import print_metrics, write_metrics_json
from flmm_lightning.runs.build import build_datamodule, test_results
from flmm_lightning.runs.chat_turns import write_turn
from flmm_lightning.runs.pretrained import save_pretrained
from flmm_lightning.selection import every_word_baseline
from flmm_lightning.training.module import FLMMModule
from flmm_lightning.training.reasoning_eval import ReasoningEvaluator

log = logging.getLogger(__name__)

Results = dict[str, dict[str, float]]


@dataclass
class FittedRun:
    """What the after-fit tasks work on: the fitted module with its trainer and data, the run's config and
    folder, and ``results``, the ``metrics.json`` entries the tasks so far returned (in their order)."""

    cfg: DictConfig
    trainer: L.Trainer
    module: FLMMModule
    datamodule: GroundingDataModule
    prompt_builder: PromptBuilder
    stored: dict[str, Any]
    output_dir: Path
    results: Results = field(default_factory=dict)

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.json"

    def grounder(self) -> Grounder:
        return Grounder(self.module.model, self.prompt_builder, self.cfg.sam.image_size)

    def split(self, setting: str) -> Dataset | None:
        return after_fit_split(self.datamodule, setting, OmegaConf.select(self.cfg, setting))


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


def reasonseg_data(cfg: DictConfig) -> DictConfig | None:
    return OmegaConf.select(cfg, "reasonseg_after_fit.data")


def drop_unresolvable_reasonseg_data(cfg: DictConfig) -> None:
    """Sets ``reasonseg_after_fit.data`` to null, with a message, when it refers to a setting this run's
    config lacks (demo's refers to ``data.synthetic``, which an experiment on one's own data has not)."""
    data = reasonseg_data(cfg)
    if data is None:
        return
    try:
        OmegaConf.to_container(data, resolve=True)
    except InterpolationResolutionError as error:
        log.warning("reasonseg_after_fit.data: %s; skipped", str(error).splitlines()[0])
        cfg.reasonseg_after_fit.data = None


def tests_after_fit(cfg: DictConfig, datamodule: GroundingDataModule) -> bool:
    """Whether a test loop runs after fitting (the test splits' or ReasonSeg's): the trainer then needs the
    callback that writes ``metrics.json`` from inside it."""
    return bool(cfg.get("test_after_fit")) and (
        bool(datamodule.test_names) or reasonseg_data(cfg) is not None
    )


def whole_image_baseline(dataset: Dataset) -> dict[str, float]:
    """cIoU/mIoU of predicting the whole image for every object: the floor a trained model must beat."""
    metric = ReferringSegmentationMetric()
    for index in range(len(dataset)):
        masks = dataset[index].masks
        metric.update(torch.ones_like(masks), masks)
    computed = metric.compute()
    return {"cIoU": float(computed["cIoU"]), "mIoU": float(computed["mIoU"])}


def reasonseg_after_fit(
    trainer: L.Trainer, module: FLMMModule, prompt_builder: PromptBuilder, cfg: DictConfig, metrics_path: Path
) -> dict[str, dict[str, float]]:
    """The test loop over ``cfg.reasonseg_after_fit.data``'s splits: reasoning segmentation, each query
    answered by the trained model's frozen LMM through the inference pipeline (``ReasoningEvaluator``, as
    ``eval data=reasonseg`` does), with the run's ``generation`` settings."""
    settings = cfg.reasonseg_after_fit
    datamodule = build_datamodule(settings.data, prompt_builder, cfg.sam.image_size)
    evaluator = ReasoningEvaluator(
        module.model, prompt_builder, cfg.sam.image_size, **generation_settings(cfg)
    )
    trainer.test(evaluator, datamodule=datamodule, weights_only=True, verbose=False)
    return test_results(evaluator, metrics_path)


class AfterFitTask(ABC):
    """One piece of the work after fitting. ``setting``: the config key that turns it on (and names its
    split); ``rank_zero_only``: global rank 0 alone runs it (it writes files or runs the LMM outside the
    trainer); ``after_testing``: skipped with ``test_after_fit=false``."""

    name: ClassVar[str]
    setting: ClassVar[str | None]
    rank_zero_only: ClassVar[bool] = False
    after_testing: ClassVar[bool] = True

    @abstractmethod
    def run(self, fitted: FittedRun) -> Results | None:
        """The task's entries for ``metrics.json``; None where it adds none (skipped, or it writes
        elsewhere)."""


class EvaluateTestSplits(AfterFitTask):
    """The trainer's test loop over the datamodule's test splits."""

    name = "test"
    setting = "test_after_fit"

    def run(self, fitted: FittedRun) -> Results | None:
        if not fitted.datamodule.test_names:
            return None
        fitted.trainer.test(fitted.module, datamodule=fitted.datamodule, weights_only=True, verbose=False)
        return test_results(fitted.module, fitted.metrics_path)


class ReasonSeg(AfterFitTask):
    """Reasoning segmentation of the test splits of another data config, answered by the trained model."""

    name = "reasonseg"
    setting = "reasonseg_after_fit.data"

    def run(self, fitted: FittedRun) -> Results | None:
        if reasonseg_data(fitted.cfg) is None:
            return None
        return reasonseg_after_fit(
            fitted.trainer, fitted.module, fitted.prompt_builder, fitted.cfg, fitted.metrics_path
        )


class EveryWordBaseline(AfterFitTask):
    """The keyword-selection figures of marking every word of a PNG split's narratives as a phrase."""

    name = "baseline_every_word"
    setting = "every_word_baseline_split"

    def run(self, fitted: FittedRun) -> Results | None:
        narratives = fitted.split(self.setting)
        if narratives is None:
            return None
        baseline = every_word_baseline(narratives[i].utterances for i in range(len(narratives)))
        return {self.name: {f"selector_{name}": value for name, value in baseline.items()}}


class GroundWhatYouSay(AfterFitTask):
    """PNG's figures on a PNG split when the keyword selector chooses the phrases, also sent to the
    loggers."""

    name = "ground_what_you_say"
    setting = "ground_what_you_say_split"
    rank_zero_only = True

    def run(self, fitted: FittedRun) -> Results | None:
        narratives = fitted.split(self.setting)
        if narratives is None:
            return None
        said = ground_what_you_say(fitted.grounder(), map(narratives.__getitem__, range(len(narratives))))
        logged = {f"{self.name}/{name}": value for name, value in said.items() if not math.isnan(value)}
        for logger in fitted.trainer.loggers:
            logger.log_metrics(logged, step=fitted.trainer.global_step)
        return {self.name: said}


class WholeImageBaseline(AfterFitTask):
    """cIoU/mIoU of the whole image as every prediction on a referring split."""

    name = "baseline_whole_image"
    setting = "whole_image_baseline_split"

    def run(self, fitted: FittedRun) -> Results | None:
        dataset = fitted.split(self.setting)
        return None if dataset is None else {self.name: whole_image_baseline(dataset)}


class MetricsReport(AfterFitTask):
    """The entries so far printed as tables and written to ``metrics.json``: before the tasks that follow,
    so that the figures are on disk whatever happens to those."""

    name = "report"
    setting = None
    rank_zero_only = True
    after_testing = False  # reports nothing when nothing ran

    def run(self, fitted: FittedRun) -> Results | None:
        if fitted.results:
            print_metrics(fitted.results, title=f"{fitted.cfg.task_name}: test metrics (%)")
            path = write_metrics_json(fitted.results, fitted.metrics_path)
            print(f"metrics written to {path}")
        return None


class ExportPretrained(AfterFitTask):
    """The trained heads as a ``save_pretrained`` directory ``<run>/pretrained``, its card listing the
    figures."""

    name = "export_pretrained"
    setting = "export_pretrained"
    rank_zero_only = True
    after_testing = False

    def run(self, fitted: FittedRun) -> Results | None:
        if fitted.cfg.get(self.setting):
            exported = save_pretrained(
                fitted.output_dir / "pretrained",
                fitted.module.model.trainable_state_dict(),
                fitted.stored,
                fitted.results,
            )
            print(f"trained heads exported to {exported} (Grounder.from_pretrained, or ckpt=)")
        return None


class ChatTurn(AfterFitTask):
    """One grounded chat turn about the first image of a split (``cfg.chat_after_fit``), its overlay and JSON
    written to ``<run>/chat/``: the trained model's conversation path, end to end."""

    name = "chat"
    setting = "chat_after_fit.split"
    rank_zero_only = True

    def run(self, fitted: FittedRun) -> Results | None:
        dataset = fitted.split(self.setting)
        if dataset is None:
            return None
        question = fitted.cfg.chat_after_fit.question
        turn = fitted.grounder().chat(dataset[0].image, question, **generation_settings(fitted.cfg))
        chat_dir = fitted.output_dir / "chat"
        chat_dir.mkdir(parents=True, exist_ok=True)
        overlay_path, _ = write_turn(turn, chat_dir, 1)
        print(f"chat: {question!r} -> {turn.answer!r} ({len(turn.phrases)} phrases): {overlay_path}")
        return None


# The measurements, their report, then what uses the trained heads (the export's card lists the figures).
AFTER_FIT: tuple[AfterFitTask, ...] = (
    EvaluateTestSplits(),
    ReasonSeg(),
    EveryWordBaseline(),
    GroundWhatYouSay(),
    WholeImageBaseline(),
    MetricsReport(),
    ExportPretrained(),
    ChatTurn(),
)


def run_after_fit(fitted: FittedRun, tasks: Sequence[AfterFitTask] = AFTER_FIT) -> Results:
    """Runs ``tasks`` in order, each one's entries added to ``fitted.results``; returns them."""
    testing = bool(fitted.cfg.get("test_after_fit"))
    if not testing:
        log.info("test_after_fit=false: no test and no after-training extras")
    rank_zero = fitted.trainer.is_global_zero
    for task in tasks:
        if (task.after_testing and not testing) or (task.rank_zero_only and not rank_zero):
            continue
        entries = task.run(fitted)
        if entries is not None:
            fitted.results.update(entries)
    return fitted.results
