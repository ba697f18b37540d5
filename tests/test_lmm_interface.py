"""Every LMM family provides, through ``lmm.base.FrozenLMM``, each operation the inference pipeline calls:
generate an answer, read it teacher-forced, score its tokens, lay attention out on the image grid and merge
marked tokens into objects, with the shapes the pipeline relies on."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides
from hydra.utils import instantiate
from samples import make_sample

from flmm_lightning.config.composition import CONF_DIR
from flmm_lightning.lmm.base import FrozenLMM
from flmm_lightning.runs.build import build_prompt_builder

TINY_FAMILIES = sorted(path.stem for path in (CONF_DIR / "model").glob("tiny_*.yaml"))
INFERENCE_OPERATIONS = {"generate", "read", "features", "selector_logits", "image_maps"}


def test_the_interface_declares_every_operation_of_the_inference_pipeline() -> None:
    assert INFERENCE_OPERATIONS <= FrozenLMM.__abstractmethods__
    assert {"image_token_id", "num_heads", "keyword_selector"} <= set(FrozenLMM.__annotations__)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_family_provides_what_the_inference_pipeline_calls(family, compose_config, tmp_path) -> None:
    cfg = compose_config([*tiny_overrides(tmp_path / "data", tmp_path / "run"), f"model={family}"])
    builder = build_prompt_builder(cfg)
    adapter = instantiate(cfg.model.lmm, torch_dtype="float32", keyword_selector=True)
    assert isinstance(adapter, FrozenLMM) and not type(adapter).__abstractmethods__
    assert isinstance(adapter.image_token_id, int) and isinstance(adapter.num_heads, int)
    assert isinstance(adapter.keyword_selector, torch.nn.Module)

    sample = make_sample(100, 150, ["a ball"], 0)
    prompt = builder.conversation_prompt([], "What is in the image?")
    with torch.no_grad():
        question = builder.collate([builder.conversation_inputs(sample, prompt, [])])
        generated = adapter.generate(question, max_new_tokens=3)
        assert len(generated) <= 3 and all(isinstance(token, int) for token in generated)

        answer_ids = builder.processor.tokenizer("a red ball on the grass", add_special_tokens=False)[
            "input_ids"
        ]
        batch = builder.collate([builder.conversation_inputs(sample, prompt, answer_ids)])
        readout = adapter.read(batch, every_utterance_token=True)
        count = len(answer_ids)
        assert int(readout.hidden_counts[0]) == count and int(readout.attention_counts[0]) == count
        assert readout.attention.shape[2] == adapter.num_heads
        (logits,) = adapter.selector_logits(readout)
        assert logits.shape == (count,)

        columns = int(readout.image_token_counts[0])
        rows = readout.attention[0, :, :, :count, :columns].permute(2, 0, 1, 3)  # [T, L, H, N]
        maps = adapter.image_maps(rows, batch.grid_hw[0])  # [T, C, h, w]
        assert maps.shape[:2] == (count, adapter.attention_channels)

        start = int(batch.utterance_start[0])
        batch.mask_ids[0, start : start + 2] = 0
        batch.mask_ids[0, start + 2 : start + count] = 1
        (features,) = adapter.features(batch, readout)
    assert features.attention_maps.shape[:2] == (2, adapter.attention_channels)
    assert features.attention_maps.shape[-2:] == maps.shape[-2:]
