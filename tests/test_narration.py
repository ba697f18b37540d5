"""Ground what you say: the keyword selector's phrases of a PNG narrative, grounded and scored by PNG's
average recall, a missed phrase with an empty mask."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric.utilities import move_data_to_device

from flmm_lightning.data.png import PNGDataset
from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.inference.narration import ground_what_you_say, match_selected_phrases
from flmm_lightning.inference.pipeline import decode_token_spans, read
from flmm_lightning.metrics import PanopticNarrativeRecall
from flmm_lightning.runs.build import build_module, build_prompt_builder

NOT = -1


def test_each_object_takes_the_phrase_sharing_most_of_its_tokens() -> None:
    # tokens:        0    1    2  3  4    5  6  7
    token_objects = [NOT, NOT, 0, 0, NOT, 1, 1, 2]
    # phrase 0 covers one token of object 0, phrase 1 two of object 0 and one of object 1
    assert match_selected_phrases(token_objects, [(1, 3), (2, 6)], 3) == [1, 1, None]
    # a tie goes to the first phrase; a phrase touching no object's token grounds nothing
    assert match_selected_phrases(token_objects, [(5, 6), (6, 7), (0, 2)], 3) == [None, 0, None]
    # an object whose tokens were all cut from the prompt is missed
    assert match_selected_phrases(token_objects, [(0, 8)], 4) == [0, 0, 0, None]
    assert match_selected_phrases(token_objects, [], 2) == [None, None]


@pytest.fixture(scope="module")
def narratives(synthetic_data) -> list:
    dataset = PNGDataset(**synthetic_data.png_kwargs("val"))
    return [dataset[i] for i in range(2)]


@pytest.fixture(scope="module")
def grounder(tiny_config) -> Grounder:
    torch.manual_seed(0)
    builder = build_prompt_builder(tiny_config)
    return Grounder(build_module(tiny_config).model, builder, tiny_config.sam.image_size, device="cpu")


def test_a_selector_that_marks_nothing_recalls_nothing(grounder: Grounder, narratives: list) -> None:
    results = ground_what_you_say(grounder, narratives, threshold=1.1)  # no sigmoid reaches 1.1
    expected = PanopticNarrativeRecall()
    for sample in narratives:
        expected.update(torch.zeros_like(sample.masks), sample.masks, sample.is_thing, sample.is_plural)
    # every phrase scores IoU 0 (the AR's first threshold, 0, still counts it)
    assert results == pytest.approx(
        {name: float(value) for name, value in expected.compute().items()}, nan_ok=True
    )
    assert results["Acc@0.5"] == 0.0 and results["AR"] < 2e-5


def test_decoding_chosen_spans_leaves_the_narratives_own_object_marks(
    grounder: Grounder, narratives: list
) -> None:
    # Ground what you say matches the chosen phrases to the narrative's annotated objects after decoding
    # them; on the CPU its read of those marks shares the batch's memory, so decoding must not rewrite them.
    encoded = grounder.encode.encode(narratives[0])
    batch = move_data_to_device(grounder.collate([encoded]), grounder.device)
    readout = read(grounder, batch)
    marks = batch.lmm.mask_ids.clone()  # [1, S]
    assert int((marks >= 0).sum()) > 0
    decoded = decode_token_spans(grounder, batch, readout, [(0, 2), (2, 3)])
    assert torch.equal(batch.lmm.mask_ids, marks)
    assert decoded.fine.shape[0] == 2
