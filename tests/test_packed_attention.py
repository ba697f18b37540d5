"""The fast path's packed vision attention: one SDPA call over padded sequences gives what transformers'
one call per image or window gives (toy Qwen2-VL, tiny Qwen2.5-VL and Qwen3-VL towers); ``eager`` keeps the
originals."""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2VLConfig

from flmm_lightning.assets import ensure_tiny_qwen2_5_vl, ensure_tiny_qwen3_vl
from flmm_lightning.lmm.packed_attention import _LAYOUTS, packed_layout, packed_sdpa
from flmm_lightning.lmm.qwen2_vl import Qwen2VLAdapter
from flmm_lightning.lmm.qwen3_vl import Qwen3VLAdapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def per_sequence_sdpa(query, key, value, lengths, scale):
    """Each sequence on its own, [T, H, d] -> [T, H, d]: what transformers does without flash-attn."""
    outputs = []
    for q, k, v in zip(*(t.split(lengths) for t in (query, key, value)), strict=True):
        attended = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)), scale=scale)
        outputs.append(attended.transpose(0, 1))
    return torch.cat(outputs)


def test_packed_sdpa_equals_one_call_per_sequence():
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 1, 64, 17, 64, 3]
    total, heads, head_dim = sum(lengths), 4, 8
    query, key, value = (torch.randn(total, heads, head_dim, generator=generator) for _ in range(3))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

    packed = packed_sdpa(query, key, value, cu_seqlens, scale=head_dim**-0.5)
    expected = per_sequence_sdpa(query, key, value, lengths, scale=head_dim**-0.5)

    assert packed.shape == (total, heads, head_dim)
    torch.testing.assert_close(packed, expected, atol=1e-6, rtol=1e-6)
    # A token only sees its own sequence: changing another sequence's keys leaves it alone.
    key[:5] += 10.0
    changed = packed_sdpa(query, key, value, cu_seqlens, scale=head_dim**-0.5)
    assert not torch.allclose(changed[:5], packed[:5])
    torch.testing.assert_close(changed[5:], packed[5:], atol=0, rtol=0)


def test_layout_is_built_once_per_boundary_tensor_and_forgotten_with_it():
    cu_seqlens = torch.tensor([0, 3, 10], dtype=torch.int32)
    first = packed_layout(cu_seqlens, 10)
    assert packed_layout(cu_seqlens, 10) is first
    assert first.slot_index.shape == (2, 7)
    assert first.sequence.tolist() == [0] * 3 + [1] * 7
    assert first.offset.tolist() == [0, 1, 2, *range(7)]
    key = id(cu_seqlens)
    del cu_seqlens
    gc.collect()
    assert key not in _LAYOUTS


def tiny_qwen2_vl_config() -> Qwen2VLConfig:
    """Qwen2-VL (no tiny asset of its own: the vision tower is what is tested), at toy size."""
    return Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14),
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=256,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        ),
    )


@pytest.mark.parametrize(
    ("adapter_class", "pretrained"),
    [
        (Qwen2VLAdapter, tiny_qwen2_vl_config),
        (Qwen2VLAdapter, ensure_tiny_qwen2_5_vl),
        (Qwen3VLAdapter, ensure_tiny_qwen3_vl),
    ],
    ids=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"],
)
def test_fused_vision_tower_is_packed_and_equals_transformers(adapter_class, pretrained):
    torch.manual_seed(0)
    adapter = adapter_class(pretrained(), 16, capture="fused", torch_dtype="float32")
    visual = adapter.model.model.visual
    config = adapter.model.config.vision_config
    grids = torch.tensor([[1, 16, 24], [1, 12, 8]])  # two image sizes, several windows each
    pixels = torch.randn(int(grids.prod(-1).sum()), 3 * config.temporal_patch_size * config.patch_size**2)
    assert type(visual.blocks[0].attn).__name__.startswith("Packed")
    with torch.no_grad():
        packed = visual(pixels, grid_thw=grids).pooler_output

    adapter.set_capture("eager")
    original_class = type(visual.blocks[0].attn)
    assert original_class in adapter_class.packed_vision_attention
    # transformers' own class, under SDPA, for the comparison (eager itself is checked by the family tests)
    adapter.model.set_attn_implementation("sdpa")
    with torch.no_grad():
        expected = visual(pixels, grid_thw=grids).pooler_output

    assert packed.shape == expected.shape
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)
    adapter.set_capture("fused")
    assert type(visual.blocks[0].attn) is adapter_class.packed_vision_attention[original_class]
