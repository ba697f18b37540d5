"""How far the batched fused capture's outputs are from the per-sample eager ones on the same batch."""

from __future__ import annotations

import torch

from flmm_lightning.bench.inputs import BenchBatch
from flmm_lightning.bench.steps import precision
from flmm_lightning.core import FLMM


@torch.no_grad()
def attention_agreement(model: FLMM, batch: BenchBatch, device: torch.device) -> dict[str, float]:
    """Max abs difference between the per-sample eager and the batched fused attention maps and text
    embeddings of the same batch; the LMM is frozen, so training does not matter."""
    lmm = model.lmm
    with precision(device):
        lmm.set_capture("eager")
        try:
            per_sample = [lmm(single.lmm)[0] for single in batch.singles]
        finally:
            lmm.set_capture("fused")
        fast = lmm(batch.batched.lmm)
    attention_diff = text_diff = attention_max = 0.0
    for ref, new in zip(per_sample, fast, strict=True):
        attention_diff = max(attention_diff, float((ref.attention_maps - new.attention_maps).abs().max()))
        attention_max = max(attention_max, float(ref.attention_maps.abs().max()))
        for ref_text, new_text in zip(ref.text_embeddings, new.text_embeddings, strict=True):
            text_diff = max(text_diff, float((ref_text.float() - new_text.float()).abs().max()))
    return {
        "attention_max_abs_diff": attention_diff,
        "attention_max": attention_max,
        "text_embedding_max_abs_diff": text_diff,
    }
