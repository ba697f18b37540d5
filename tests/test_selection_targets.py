"""The keyword selector's targets from real PNG narratives through the tiny Qwen2.5-VL prompt builder, and
the every-word baseline."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from flmm_lightning.assets import ensure_tiny_qwen2_5_vl
from flmm_lightning.boundaries import NOT_GROUNDED
from flmm_lightning.data import PNGDataset
from flmm_lightning.lmm.qwen2_vl import Qwen2VLPromptBuilder
from flmm_lightning.selection import (
    every_word_baseline,
    narrative_phrase_spans,
    narrative_token_offsets,
    object_token_spans,
    phrases_from_scores,
    selector_targets,
)


@pytest.fixture(scope="module")
def png_samples(fixtures_dir: Path):
    root = fixtures_dir / "coco_sample"
    dataset = PNGDataset(
        root / "annotations" / "png_sample.json",
        root / "annotations" / "panoptic_sample.json",
        root / "panoptic",
        root / "images",
    )
    samples = [dataset[i] for i in range(len(dataset))]
    assert len(samples) == 2
    assert any(obj == NOT_GROUNDED for sample in samples for _, obj in sample.utterances)
    return samples


@pytest.mark.filterwarnings("ignore:.*exceed model.prompt.max_pixels")
def test_targets_of_a_png_batch(png_samples):
    builder = Qwen2VLPromptBuilder(ensure_tiny_qwen2_5_vl())
    tokenizer = builder.processor.tokenizer
    # A longer narrative last, so that the others are padded.
    longer = dataclasses.replace(
        png_samples[1], utterances=[*png_samples[1].utterances, (" Nothing else.", -1)]
    )
    png_samples = [*png_samples, longer]
    prompts = [builder(sample) for sample in png_samples]
    batch = builder.collate(prompts)
    # Independently of the builder: each utterance's own tokens, at the end of the sample's ids.
    utterance_ids = [
        [tokenizer.encode(text, add_special_tokens=False) for text, _ in sample.utterances]
        for sample in png_samples
    ]
    utterance_start = torch.tensor(
        [len(p.input_ids) - sum(map(len, ids)) for p, ids in zip(prompts, utterance_ids, strict=True)]
    )
    assert not batch.attention_mask[:2].all()

    labels, valid = selector_targets(batch.mask_ids, batch.attention_mask, utterance_start)
    assert labels.dtype == valid.dtype == torch.bool and labels.shape == valid.shape == batch.input_ids.shape
    for b, sample in enumerate(png_samples):
        expected = [
            obj != NOT_GROUNDED
            for ids, (_, obj) in zip(utterance_ids[b], sample.utterances, strict=True)
            for _ in ids
        ]
        assert labels[b][valid[b]].tolist() == expected
        assert not labels[b][~valid[b]].any()
        narrative = "".join(text for text, _ in sample.utterances)
        assert tokenizer.decode(batch.input_ids[b][valid[b]]) == narrative
        # Ground-truth phrases in token space: the grounded utterances, in order.
        token_objects = batch.mask_ids[b][valid[b]]  # [T]
        phrase_ids = [batch.input_ids[b][valid[b]][s:e] for s, e in object_token_spans(token_objects)]
        assert [tokenizer.decode(ids) for ids in phrase_ids] == sample.phrases


def test_a_perfect_selector_finds_the_narratives_phrases(png_samples):
    """Scores equal to the labels, through the offsets and the snapping, give the ground-truth spans."""
    tokenizer = Qwen2VLPromptBuilder(ensure_tiny_qwen2_5_vl()).processor.tokenizer
    for sample in png_samples:
        text, targets = narrative_phrase_spans(sample.utterances)
        offsets = narrative_token_offsets(tokenizer, sample.utterances)
        scores = [
            float(obj != NOT_GROUNDED)
            for utterance, obj in sample.utterances
            for _ in tokenizer.encode(utterance, add_special_tokens=False)
        ]
        phrases = phrases_from_scores(text, offsets, scores)
        assert [p.char_span for p in phrases] == targets
        assert [p.text for p in phrases] == [phrase.strip() for phrase in sample.phrases]


def test_narrative_spans_merge_one_objects_utterances_and_strip_them():
    utterances = [("A ", -1), ("big", 0), (" dog", 0), (" and ", -1), (" a ball.", 1), ("x", 2), ("y", 3)]
    text, spans = narrative_phrase_spans(utterances)
    assert text == "A big dog and  a ball.xy"
    assert [text[s:e] for s, e in spans] == ["big dog", "a ball", "x", "y"]
    assert object_token_spans([-1, 0, 0, -1, 1, 2, 3]) == [(1, 3), (4, 5), (5, 6), (6, 7)]


def test_every_word_baseline_against_a_word_count(png_samples):
    narratives = [sample.utterances for sample in png_samples]
    hits = predicted = targets = 0
    for utterances in narratives:
        grounded, start = set(), 0
        for utterance, obj in utterances:
            if obj != NOT_GROUNDED:
                grounded.add((start, start + len(utterance)))
            start += len(utterance)
        words = [m.span() for m in re.finditer(r"\w+", "".join(text for text, _ in utterances))]
        hits += len(grounded & set(words))
        predicted += len(words)
        targets += len(grounded)
    result = every_word_baseline(narratives)
    assert hits > 0
    assert result["phrase_precision"] == hits / predicted
    assert result["phrase_recall"] == hits / targets
    assert result["phrase_F1"] == 2 * hits / (predicted + targets)
