"""The reasoning evaluator on the tiny offline model: a reasoning split's queries are encoded where they are
answered, in the inference pipeline, and the Lightning module refuses such a split."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import pytest
import torch
from lightning import Callback

from flmm_lightning.boundaries import GroundingSample, PromptBuilder, PromptInputs
from flmm_lightning.data import ReasonSegDataset, RefCocoDataset, SyntheticPaths, reasoning_prompt
from flmm_lightning.data.datamodule import GroundingDataModule
from flmm_lightning.runs.build import build_module, build_prompt_builder
from flmm_lightning.training.callbacks import with_training_guards
from flmm_lightning.training.module import FLMMModule
from flmm_lightning.training.reasoning_eval import ReasoningEvaluator

MAX_NEW_TOKENS = 4
SPLIT = "synthetic_reasonseg_val"

pytestmark = pytest.mark.usefixtures("pinned_threads")


@pytest.fixture(scope="module")
def module(tiny_config) -> FLMMModule:
    torch.manual_seed(0)
    return build_module(tiny_config)


def recording(builder: PromptBuilder) -> list[tuple[str, str, int]]:
    """Makes ``builder`` log each encoding it makes, its own code still making it: ``("grounding", image id,
    0)`` for the training prompt, ``("turn", prompt, number of answer tokens)`` for a conversation turn."""
    log: list[tuple[str, str, int]] = []

    class Recording(type(builder)):
        def __call__(self, sample: GroundingSample) -> PromptInputs:
            log.append(("grounding", str(sample.image_id), 0))
            return super().__call__(sample)

        def conversation_inputs(
            self, sample: GroundingSample, prompt: str, answer_ids: Sequence[int]
        ) -> PromptInputs:
            log.append(("turn", prompt, len(answer_ids)))
            return super().conversation_inputs(sample, prompt, answer_ids)

    builder.__class__ = Recording
    return log


def quiet_trainer(callbacks: list[Callback] | None = None) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, callbacks=callbacks
    )


def test_each_query_is_encoded_once_where_it_is_answered(
    module: FLMMModule, synthetic_data: SyntheticPaths, tiny_config
) -> None:
    """The loader encodes nothing; the pipeline encodes each query's question once to generate the answer,
    then (where there is an answer) once more with it to read it, as ``Grounder.segment`` does."""
    dataset = ReasonSegDataset(**synthetic_data.reasonseg_kwargs("val"), query_mode="all", max_queries=4)
    builder = build_prompt_builder(tiny_config)
    log = recording(builder)
    size = tiny_config.sam.image_size
    datamodule = GroundingDataModule(
        builder, size, test_sets={SPLIT: dataset}, eval_batch_size=3, num_workers=0
    )
    evaluator = ReasoningEvaluator(module.model, builder, size, max_new_tokens=MAX_NEW_TOKENS)
    # A training run's callbacks, as after a fit that ran elsewhere (ddp_spawn's workers): the guards ask
    # nothing of an evaluator, which does not train
    quiet_trainer(with_training_guards([])).test(evaluator, datamodule=datamodule, verbose=False)

    assert [entry for entry in log if entry[0] != "turn"] == []
    per_query: list[list[str]] = []
    for _, prompt, answer_tokens in log:
        if answer_tokens == 0:
            per_query.append([prompt])
        else:  # the read of the answer just generated, its prompt unchanged
            assert per_query[-1] == [prompt] and answer_tokens <= MAX_NEW_TOKENS
            per_query[-1].append(prompt)
    samples = [dataset[index] for index in range(len(dataset))]
    assert len(per_query) == len(samples) == 4
    for sample, prompts in zip(samples, per_query, strict=True):
        question = reasoning_prompt(sample.phrases[0], bool(sample.is_sentence[0]))
        assert question in prompts[0] and prompts[0].endswith("It is")
    assert set(evaluator.last_results) == {SPLIT}
    assert {"gIoU", "cIoU", "coarse_gIoU", "coarse_cIoU"} <= set(evaluator.last_results[SPLIT])


def test_the_lightning_module_refuses_a_reasoning_split(
    module: FLMMModule, synthetic_data: SyntheticPaths, tiny_config
) -> None:
    size = tiny_config.sam.image_size
    builder = build_prompt_builder(tiny_config)
    reasoning = ReasonSegDataset(**synthetic_data.reasonseg_kwargs("val"), max_queries=1)
    datamodule = GroundingDataModule(builder, size, test_sets={SPLIT: reasoning}, num_workers=0)
    with pytest.raises(
        ValueError, match=f"evaluation split {SPLIT} is a reasoning split.*reasoning evaluator"
    ):
        quiet_trainer().test(module, datamodule=datamodule, verbose=False)

    referring = RefCocoDataset(**synthetic_data.refcoco_kwargs("val"), text_mode="first")
    datamodule = GroundingDataModule(builder, size, test_sets={"refcoco_val": referring}, num_workers=0)
    evaluator = ReasoningEvaluator(module.model, builder, size)
    with pytest.raises(ValueError, match="evaluation split refcoco_val is scored as 'res', not a reasoning"):
        quiet_trainer().test(evaluator, datamodule=datamodule, verbose=False)
