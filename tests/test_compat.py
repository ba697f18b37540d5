"""Each transformers name outside its public API that the project uses (``lmm/compat.py``), checked for the
behaviour the project relies on. A failure names the installed transformers version: the next upgrade breaks
here, one touch point per test, before it breaks a training run."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, Qwen2VLConfig

from flmm_lightning.assets import (
    ensure_tiny_internvl,
    ensure_tiny_llava,
    ensure_tiny_llava_next,
    ensure_tiny_qwen2_5_vl,
    ensure_tiny_qwen3_vl,
)
from flmm_lightning.lmm import compat

VERSION = f"transformers {transformers.__version__}"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
SIZES = [(100, 150), (230, 90), (64, 64)]  # (height, width): wide, tall, square


def noise_image(height: int, width: int) -> Image.Image:
    pixels = np.random.default_rng(height * 1000 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_installed_transformers_is_the_pinned_tested_range() -> None:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pinned = [d for d in dependencies if d.startswith("transformers")]
    assert pinned == [f"transformers{compat.TESTED_TRANSFORMERS}"], "pyproject.toml and compat.py disagree"
    assert Version(transformers.__version__) in SpecifierSet(compat.TESTED_TRANSFORMERS), (
        f"{VERSION} is outside the tested range {compat.TESTED_TRANSFORMERS}"
    )


def test_a_failing_touch_point_names_the_version_and_the_range() -> None:
    with pytest.raises(compat.TransformersAPIError) as caught:
        compat.num_image_tokens(object(), 10, 10)
    message = str(caught.value)
    assert (
        VERSION in message
        and compat.TESTED_TRANSFORMERS in message
        and "_get_num_multimodal_tokens" in message
    )


def test_sdpa_attention_forward_is_sdpa_with_grouped_keys() -> None:
    """The ``fused`` capture hands its output to this function: [B, H, S, d] in, [B, S, H, d] out."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 7, 8
    query = torch.randn(batch, heads, length, dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=generator) for _ in range(2))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True

    output, weights = compat.sdpa_attention_forward(module, query, key, value, None, scaling=dim**-0.5)

    groups = heads // kv_heads
    expected = F.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), is_causal=True
    )
    assert weights is None, VERSION
    torch.testing.assert_close(output, expected.transpose(1, 2), msg=lambda m: f"{VERSION}: {m}")


def test_registered_attention_gets_the_sdpa_masks() -> None:
    """An attention implementation registered with SDPA's masks receives None for an unpadded batch (causal by
    ``is_causal``) and a boolean [B, 1, Q, K] mask that hides the padding of a padded one."""
    seen: list[torch.Tensor | None] = []

    def probe(module, query, key, value, attention_mask, scaling=None, **kwargs):
        seen.append(attention_mask)
        return compat.sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )

    compat.register_sdpa_like_attention("flmm_compat_probe", probe)
    model = AutoModelForImageTextToText.from_pretrained(
        ensure_tiny_qwen2_5_vl(), attn_implementation={"": "sdpa", "text_config": "flmm_compat_probe"}
    )
    input_ids = torch.randint(10, 100, (2, 6))
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=torch.ones(2, 6, dtype=torch.long))
        assert seen and all(mask is None for mask in seen), f"{VERSION}: unpadded batch got {seen[0]}"
        seen.clear()
        padding = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
        model(input_ids=input_ids, attention_mask=padding)
    mask = seen[0]
    assert mask is not None and mask.dtype == torch.bool and mask.shape == (2, 1, 6, 6), f"{VERSION}: {mask}"
    assert not mask[1, 0, :, 4:].any() and mask[0, 0, -1].all(), f"{VERSION}: padding not masked"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_vision_attention_keeps_what_the_packed_subclass_reads(family: str) -> None:
    """The packed subclass (same weights, ``qkv``/``proj``/``num_heads``/``scaling``, the family's rotary
    function) gives what transformers' own forward gives, two packed images of different lengths."""
    from flmm_lightning.lmm.qwen2_vl import Qwen2VLAdapter
    from flmm_lightning.lmm.qwen3_vl import Qwen3VLAdapter

    if family == "qwen2_vl":
        vision = Qwen2VLConfig(vision_config=dict(embed_dim=32, num_heads=2)).vision_config
        original = compat.Qwen2VLVisionAttention
    else:
        ensure = ensure_tiny_qwen2_5_vl if family == "qwen2_5_vl" else ensure_tiny_qwen3_vl
        vision = AutoConfig.from_pretrained(ensure()).vision_config
        original = (
            compat.Qwen2_5_VLVisionAttention if family == "qwen2_5_vl" else compat.Qwen3VLVisionAttention
        )
    vision._attn_implementation = "sdpa"
    packed_class = {**Qwen2VLAdapter.packed_vision_attention, **Qwen3VLAdapter.packed_vision_attention}[
        original
    ]
    torch.manual_seed(0)
    attention = original(vision).eval()
    dim, head_dim = attention.qkv.in_features, attention.qkv.in_features // attention.num_heads
    lengths = [5, 9]
    hidden = torch.randn(sum(lengths), dim)
    cu_seqlens = torch.tensor([0, 5, 14], dtype=torch.int32)
    angles = torch.randn(sum(lengths), head_dim)
    position_embeddings = (angles.cos(), angles.sin())

    with torch.no_grad():
        expected = attention(hidden, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings)
        attention.__class__ = packed_class
        packed = attention(hidden, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings)
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{VERSION}: {m}")


@pytest.mark.parametrize("ensure", [ensure_tiny_llava, ensure_tiny_llava_next], ids=["llava", "llava_next"])
def test_num_image_tokens_is_what_the_processor_expands(ensure) -> None:
    processor = AutoProcessor.from_pretrained(ensure())
    for height, width in SIZES:
        encoded = processor(
            images=[noise_image(height, width)], text=[processor.image_token], return_tensors="pt"
        )
        expanded = int((encoded["input_ids"] == processor.image_token_id).sum())
        counted = compat.num_image_tokens(processor, height, width)
        assert counted == expanded, f"{VERSION}: {height}x{width}: counted {counted}, expanded {expanded}"


def test_unpadded_features_and_best_resolution_give_the_llava_next_token_count() -> None:
    """Base grid + any-res cells + one newline per any-res row = the placeholder tokens of the image."""
    processor = AutoProcessor.from_pretrained(ensure_tiny_llava_next())
    image_processor = processor.image_processor
    side = image_processor.crop_size.height
    patches = side // processor.patch_size
    for height, width in SIZES:
        best_h, best_w = compat.select_best_resolution([height, width], image_processor.image_grid_pinpoints)
        cells, rows = compat.unpadded_features(
            processor, height, width, patches, best_h // side, best_w // side
        )
        encoded = processor(
            images=[noise_image(height, width)], text=[processor.image_token], return_tensors="pt"
        )
        expanded = int((encoded["input_ids"] == processor.image_token_id).sum())
        assert patches * patches + cells + rows == expanded, f"{VERSION}: {height}x{width}"


def test_optimal_tiled_canvas_gives_the_internvl_tiles() -> None:
    processor = AutoProcessor.from_pretrained(ensure_tiny_internvl())
    arrangements = {}
    for height, width in SIZES:
        rows, columns = compat.optimal_tiled_canvas(processor.image_processor, height, width)
        encoded = processor(
            images=[noise_image(height, width)], text=[processor.image_token], return_tensors="pt"
        )
        tiles = rows * columns
        assert encoded["pixel_values"].shape[0] == tiles + (tiles > 1), f"{VERSION}: {height}x{width}"
        arrangements[height, width] = (rows, columns)
    # (rows, columns), not GOT-OCR2's (columns, rows): the wide image lies in one row, the tall in one column.
    assert arrangements[100, 150][0] == 1 < arrangements[100, 150][1], VERSION
    assert arrangements[230, 90][1] == 1 < arrangements[230, 90][0], VERSION


def test_smart_resize_is_the_qwen_processor_size() -> None:
    processor = AutoProcessor.from_pretrained(ensure_tiny_qwen2_5_vl())
    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    for height, width in SIZES:
        encoded = processor(
            images=[noise_image(height, width)], text=[processor.image_token], return_tensors="pt"
        )
        _, grid_h, grid_w = encoded["image_grid_thw"][0].tolist()
        resized = compat.smart_resize(
            height,
            width,
            factor=factor,
            min_pixels=image_processor.size.shortest_edge,
            max_pixels=image_processor.size.longest_edge,
        )
        patch = image_processor.patch_size
        assert resized == (grid_h * patch, grid_w * patch), f"{VERSION}: {height}x{width}"


def test_hidden_states_need_the_recording_registry_and_restore_brings_them_back() -> None:
    """What an unpickled model lacks (its classes missing from the registry) and what restoring gives back."""
    model = AutoModelForImageTextToText.from_pretrained(ensure_tiny_qwen2_5_vl()).eval()
    registry = compat._CAN_RECORD_REGISTRY
    names = {str(type(m)) for m in model.modules() if isinstance(m, transformers.PreTrainedModel)}
    saved = {name: dict.get(registry, name) for name in names}
    input_ids = torch.randint(10, 100, (1, 5))
    try:
        for name in names:
            dict.pop(registry, name, None)
        with torch.no_grad():
            lost = model(input_ids=input_ids, output_hidden_states=True).hidden_states
        assert lost is None, f"{VERSION} records hidden states without the registry: restore may be obsolete"
        compat.restore_output_recording(model)
        with torch.no_grad():
            restored = model(input_ids=input_ids, output_hidden_states=True).hidden_states
        layers = model.config.text_config.num_hidden_layers
        assert restored is not None and len(restored) == layers + 1, f"{VERSION}: no hidden states"
    finally:
        for name, value in saved.items():
            if value is not None:
                dict.__setitem__(registry, name, value)
