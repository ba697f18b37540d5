"""The keyword selector inside the model: what the adapter reads for it, what it learns from, how it is
scored on narratives, and that it rides in checkpoints."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from samples import make_sample

from flmm_lightning.boundaries import NOT_GROUNDED
from flmm_lightning.data.batch import EncodedDataset, GroundingCollate
from flmm_lightning.heads import keyword_selector_loss
from flmm_lightning.lmm.qwen2_vl import Qwen2VLAdapter, Qwen2VLPromptBuilder
from flmm_lightning.metrics import KeywordSelectionMetric
from flmm_lightning.runs.build import build_module, build_prompt_builder
from flmm_lightning.selection import narrative_phrase_spans
from flmm_lightning.selection.targets import narrative_selection_spans

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REFCOCO_LIKE = make_sample(100, 150, ["a man in a red shirt", "the dog on the left"], 0)
PNG_LIKE = make_sample(
    120,
    90,
    ["two people", "a frisbee"],
    1,
    utterances=[
        ("In this picture we can see ", NOT_GROUNDED),
        ("two people", 0),
        (" playing with ", NOT_GROUNDED),
        ("a frisbee", 1),
        (".", NOT_GROUNDED),
    ],
)
PNG_LIKE.narrative = True


@pytest.fixture(scope="module")
def builder(tiny_qwen_dir):
    return Qwen2VLPromptBuilder(tiny_qwen_dir)


@pytest.fixture(scope="module")
def adapter(tiny_qwen_dir):
    torch.manual_seed(0)
    return Qwen2VLAdapter(tiny_qwen_dir, text_proj_dim=32, torch_dtype="float32", keyword_selector=True)


def utterance_token_labels(builder, sample) -> torch.Tensor:
    """Per utterance token (each utterance tokenised on its own): does it belong to a grounded utterance."""
    tokenizer = builder.processor.tokenizer
    labels = []
    for text, obj in sample.utterances:
        labels += [obj >= 0] * len(tokenizer.encode(text, add_special_tokens=False))
    return torch.tensor(labels)


def test_selector_scores_every_utterance_token_and_leaves_the_objects_alone(builder, adapter):
    batch = builder.collate([builder(REFCOCO_LIKE), builder(PNG_LIKE)])
    with_selector = adapter(batch)
    for sample, features in zip((REFCOCO_LIKE, PNG_LIKE), with_selector, strict=True):
        assert features.selector_logits.shape == utterance_token_labels(builder, sample).shape
    # Reading every answer token (a conversation) gives the same objects as reading only theirs (training).
    every_token = adapter.features(batch, adapter.read(batch, every_utterance_token=True))
    selector, adapter.keyword_selector = adapter.keyword_selector, None
    try:
        without = adapter(batch)
    finally:
        adapter.keyword_selector = selector
    for reference, *others in zip(without, with_selector, every_token, strict=True):
        assert reference.selector_logits is None
        for other in others:
            torch.testing.assert_close(other.attention_maps, reference.attention_maps, rtol=1e-5, atol=1e-7)
            for ours, theirs in zip(other.text_embeddings, reference.text_embeddings, strict=True):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(every_token[1].selector_logits, with_selector[1].selector_logits)


@pytest.fixture(scope="module")
def module_and_builder(tiny_config):
    torch.manual_seed(0)
    return build_module(tiny_config), build_prompt_builder(tiny_config), tiny_config.sam.image_size


def encoded_batch(prompt_builder, sam_image_size, samples):
    encode = EncodedDataset([], prompt_builder, sam_image_size)
    return GroundingCollate(prompt_builder)([encode.encode(sample) for sample in samples])


def test_selector_learns_from_narratives_only(module_and_builder):
    module, prompt_builder, sam_image_size = module_and_builder
    module = copy.deepcopy(module).train()
    mixed = encoded_batch(prompt_builder, sam_image_size, [REFCOCO_LIKE, PNG_LIKE])
    predictions = module(mixed)
    losses = module.model.losses(mixed, predictions)
    labels = utterance_token_labels(prompt_builder, PNG_LIKE)
    expected = keyword_selector_loss(predictions[1].features.selector_logits, labels, torch.ones_like(labels))
    torch.testing.assert_close(losses["keyword_selector"], expected)
    plain = {k: v for k, v in losses.items() if k not in ("loss", "keyword_selector")}
    mask_total = sum(module.model.loss_weights[k] * plain[k] for k in module.model.loss_weights if k in plain)
    torch.testing.assert_close(
        losses["loss"], mask_total + module.model.loss_weights["keyword_selector"] * expected
    )
    losses["loss"].backward()
    assert module.model.lmm.keyword_selector.mlp[0].weight.grad.abs().sum() > 0

    module.zero_grad(set_to_none=True)
    refcoco_only = encoded_batch(prompt_builder, sam_image_size, [REFCOCO_LIKE])
    losses = module.model.losses(refcoco_only, module(refcoco_only))
    assert float(losses["keyword_selector"].detach()) == 0.0
    losses["loss"].backward()
    # Attached but zero: every DDP rank's gradient still covers the selector.
    gradient = module.model.lmm.keyword_selector.mlp[0].weight.grad
    assert gradient is not None and not gradient.any()


def test_selector_weights_ride_in_the_checkpoint(module_and_builder):
    module = module_and_builder[0]
    keys = [key for key in module.model.trainable_state_dict() if key.startswith("lmm.keyword_selector.")]
    assert keys and all(p.requires_grad for p in module.model.lmm.keyword_selector.parameters())


def test_narrative_selection_spans_against_the_grounded_phrases(builder):
    tokenizer = builder.processor.tokenizer
    labels = utterance_token_labels(builder, PNG_LIKE)
    text, targets = narrative_phrase_spans(PNG_LIKE.utterances)
    assert [text[s:e] for s, e in targets] == ["two people", "a frisbee"]

    perfect = torch.where(labels, 8.0, -8.0)
    predicted, target_spans = narrative_selection_spans(tokenizer, PNG_LIKE.utterances, perfect)
    assert predicted == target_spans == targets

    metric = KeywordSelectionMetric()
    # Everything selected: one phrase spanning the narrative, which matches no grounded phrase.
    metric.update(*narrative_selection_spans(tokenizer, PNG_LIKE.utterances, torch.full_like(perfect, 8.0)))
    assert metric.compute()["phrase_F1"] == 0.0
