"""Fused capture (SDPA + recomputed selected rows) equals the eager reference, per sample and in a batch."""

from __future__ import annotations

import copy

import pytest
import torch
from samples import make_sample

from flmm_lightning.lmm.capture import build_capture, gather_rows_cols, recording, selected_attention_probs
from flmm_lightning.lmm.qwen2_vl import Qwen2VLAdapter, Qwen2VLPromptBuilder

# float32 rounding differs with the kernel, the batch layout, the CPU and the thread count, so no fixed
# tolerance holds everywhere. What must hold: every float32 path is about as close to the exact values (the
# eager path in float64) as the plain eager float32 path of one sample is; a bug (a wrong mask, a padded
# key let in) is an error of the size of the attention itself, far beyond this factor.
ACCURACY_FACTOR = 4.0
EPS32 = torch.finfo(torch.float32).eps


SAMPLES = [
    make_sample(100, 150, ["a man in a red shirt", "the dog"], 0),
    make_sample(230, 120, ["left cup"], 1),
    make_sample(60, 70, ["sky", "tree on the right", "car", "bird"], 2),
]


@pytest.fixture(scope="module")
def builder(tiny_qwen_dir):
    return Qwen2VLPromptBuilder(tiny_qwen_dir)


@pytest.fixture(scope="module")
def adapters(tiny_qwen_dir):
    fused = Qwen2VLAdapter(tiny_qwen_dir, text_proj_dim=8, capture="fused", torch_dtype="float32")
    eager = Qwen2VLAdapter(tiny_qwen_dir, text_proj_dim=8, capture="eager", torch_dtype="float32")
    eager.load_state_dict(fused.state_dict())
    return fused, eager


@pytest.fixture(scope="module")
def batch_outputs(builder, adapters):
    prompts = [builder(s) for s in SAMPLES]
    fused, eager = adapters
    exact = copy.deepcopy(eager).double()
    batch = builder.collate(prompts)
    singles = [builder.collate([p]) for p in prompts]
    return {
        "fused_batch": fused(batch),
        "eager_batch": eager(batch),
        "fused_single": [fused(s)[0] for s in singles],
        "eager_single": [eager(s)[0] for s in singles],
        "exact_single": [exact(s)[0] for s in singles],
    }


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.double() - b.double()).abs().max().item()


def assert_as_accurate_as_eager(
    tested: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, what: str
) -> None:
    """``tested`` deviates from the float64 values ``exact`` at most ACCURACY_FACTOR times as much as the
    eager float32 ``eager`` does (or as one float32 rounding of the largest value, should eager be exact)."""
    error, eager_error = max_diff(tested, exact), max_diff(eager, exact)
    bound = ACCURACY_FACTOR * max(eager_error, EPS32 * exact.abs().max().item())
    assert error <= bound, f"{what}: {error:.3g} from float64, eager float32 {eager_error:.3g}"


def assert_path_as_accurate_as_eager(outputs: dict, name: str) -> None:
    references = zip(outputs["eager_single"], outputs["exact_single"], strict=True)
    for index, (features, (eager, exact)) in enumerate(zip(outputs[name], references, strict=True)):
        what = f"{name}[{index}]"
        assert_as_accurate_as_eager(
            features.attention_maps, eager.attention_maps, exact.attention_maps, f"{what} maps"
        )
        for k, texts in enumerate(
            zip(features.text_embeddings, eager.text_embeddings, exact.text_embeddings, strict=True)
        ):
            assert_as_accurate_as_eager(*texts, f"{what} text embedding {k}")


def test_adapters_run_different_attention(adapters):
    fused, eager = adapters
    assert fused.model.config.text_config._attn_implementation == "flmm_capture"
    assert fused.model.config.vision_config._attn_implementation == "sdpa"
    assert eager.model.config.text_config._attn_implementation == "eager"


def test_fused_equals_eager_single_sample(batch_outputs):
    assert_path_as_accurate_as_eager(batch_outputs, "fused_single")


def test_fused_equals_eager_padded_batch(batch_outputs):
    assert_path_as_accurate_as_eager(batch_outputs, "fused_batch")


@pytest.mark.parametrize("mode", ["fused", "eager"])
def test_batch_equals_single(batch_outputs, mode):
    assert_path_as_accurate_as_eager(batch_outputs, f"{mode}_batch")


def test_maps_are_informative(batch_outputs):
    """Guards the comparisons above against a degenerate model (all-uniform or all-zero maps)."""
    for features in batch_outputs["fused_batch"]:
        maps = features.attention_maps.flatten(2)  # [n, C, h*w]
        # probabilities over part of the keys: their float32 sum is at most 1 plus its rounding
        assert torch.all(maps >= 0) and torch.all(maps.sum(-1) <= 1 + maps.shape[-1] * EPS32)
        spread = maps.amax(-1) / maps.mean(-1)
        assert spread.max() > 2.0


def test_capture_everywhere_records_decoder_layers_only(tiny_qwen_dir, builder, batch_outputs):
    """With the capture attention set on the vision tower too, only decoder self-attention is recorded."""
    adapter = Qwen2VLAdapter(tiny_qwen_dir, text_proj_dim=8, capture="fused", torch_dtype="float32")
    adapter.model.set_attn_implementation("flmm_capture")
    assert adapter.model.config.vision_config._attn_implementation == "flmm_capture"
    features = adapter(builder.collate([builder(SAMPLES[0])]))[0]
    eager, exact = batch_outputs["eager_single"][0], batch_outputs["exact_single"][0]
    assert_as_accurate_as_eager(
        features.attention_maps, eager.attention_maps, exact.attention_maps, "capture everywhere"
    )


def test_recording_without_capture_attention_raises():
    with recording(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)) as recorder:
        pass
    with pytest.raises(RuntimeError, match="no attention was captured"):
        recorder.stacked()


def test_build_capture_rejects_unknown():
    with pytest.raises(ValueError, match="capture must be one of"):
        build_capture("flash")


def _eager_reference(query, key, additive_mask, scaling):
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    scores = query @ key.transpose(2, 3) * scaling + additive_mask
    return torch.softmax(scores, dim=-1)  # [B, H, Q, K]


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_selected_probs_match_full_softmax(mask_kind):
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, seq, head_dim = 2, 4, 2, 9, 8
    query = torch.randn(batch, heads, seq, head_dim, generator=generator)
    key = torch.randn(batch, kv_heads, seq, head_dim, generator=generator)
    lengths = torch.tensor([9, 6])
    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    not_padding = torch.arange(seq)[None, :] < lengths[:, None]  # [B, K]
    allowed = causal[None, None] & not_padding[:, None, None, :]  # [B, 1, Q, K]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    mask = {"none": None, "bool": allowed, "float": additive}[mask_kind]
    if mask_kind == "none":
        lengths = torch.tensor([9, 9])
        additive = torch.zeros(allowed.shape).masked_fill(~causal[None, None], torch.finfo(torch.float32).min)

    query_positions = torch.tensor([[7, 8, 3], [4, 5, 0]])
    key_positions = torch.tensor([[1, 2, 3, 4], [0, 2, 3, 0]])
    got = selected_attention_probs(query, key, mask, 0.3, query_positions, key_positions)
    want = gather_rows_cols(_eager_reference(query, key, additive, 0.3), query_positions, key_positions)
    assert max_diff(got, want) < 1e-6


def test_selected_probs_stay_fp32_under_autocast():
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 4, 6, 8, generator=generator)
    key = torch.randn(1, 2, 6, 8, generator=generator)
    query_positions, key_positions = torch.tensor([[5, 4]]), torch.tensor([[0, 1, 2]])
    exact = selected_attention_probs(query, key, None, 0.5, query_positions, key_positions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = selected_attention_probs(query, key, None, 0.5, query_positions, key_positions)
    assert mixed.dtype == torch.float32 and max_diff(mixed, exact) == 0.0
