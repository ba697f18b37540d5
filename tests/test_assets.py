"""The tiny Qwen2.5-VL: deterministic, cached atomically, loadable offline like a real checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from flmm_lightning import assets


def test_same_seed_same_weights(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assets.build_tiny_qwen2_5_vl(tmp_path / name, seed=seed)
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_config_matches_recipe():
    config = assets.tiny_qwen2_5_vl_config()
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (4, 4, 2)
    assert text.hidden_size == 64 and text.vocab_size == 151936
    assert sum(text.rope_parameters["mrope_section"]) * 2 == text.hidden_size // text.num_attention_heads
    assert vision.depth == 2 and vision.out_hidden_size == text.hidden_size
    assert (vision.patch_size, vision.spatial_merge_size) == (14, 2)
    assert all(0 <= i < vision.depth for i in vision.fullatt_block_indexes)


def test_ensure_builds_once_and_rebuilds_on_new_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    path = assets.ensure_tiny_qwen2_5_vl(initializer_range=0.05)
    assert path == tmp_path / assets.TINY_QWEN2_5_VL
    weights = path / "model.safetensors"
    first_mtime = weights.stat().st_mtime_ns
    assert assets.ensure_tiny_qwen2_5_vl(initializer_range=0.05) == path
    assert weights.stat().st_mtime_ns == first_mtime

    before = load_file(weights)
    assets.ensure_tiny_qwen2_5_vl(initializer_range=0.06)
    after = load_file(weights)
    q_proj = "model.layers.0.self_attn.q_proj.weight"  # saved under the released checkpoints' key names
    assert not torch.equal(before[q_proj], after[q_proj])
    assert sorted(p.name for p in tmp_path.iterdir()) == [assets.TINY_QWEN2_5_VL]


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def broken_build(out_dir, initializer_range, seed):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setitem(assets.TINY_LMMS, assets.TINY_QWEN2_5_VL, assets.TinyLMMRecipe(1, broken_build))
    with pytest.raises(KeyboardInterrupt):
        assets.ensure_tiny_qwen2_5_vl(cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_loads_offline_like_a_real_checkpoint(tmp_path):
    """A fresh process, offline, with an empty hub cache: everything comes from the directory."""
    path = assets.ensure_tiny_qwen2_5_vl()
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained({str(path)!r})
        processor = AutoProcessor.from_pretrained({str(path)!r})
        tokenizer = processor.tokenizer
        assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration", type(model)
        assert type(processor).__name__ == "Qwen2_5_VLProcessor", type(processor)
        assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
        assert model.dtype == torch.float32
        expected = {{
            "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
            "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
            "<|video_pad|>": 151656, "<|file_sep|>": 151664,
        }}
        assert {{t: tokenizer.convert_tokens_to_ids(t) for t in expected}} == expected
        assert len(tokenizer) == 151665
        assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
        assert tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]
        size = processor.image_processor.size
        assert (size.shortest_edge, size.longest_edge) == (56 * 56, 256 * 256)
        print("ok")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_llama_tokenizer_is_deterministic_and_llama_shaped(tmp_path):
    from transformers import AutoTokenizer

    first = assets.build_llama_tokenizer("<image>")
    second = assets.build_llama_tokenizer("<image>")
    assert first.get_vocab() == second.get_vocab()
    # LLaMA's layout: <unk> <s> </s>, then byte fallback, so that any text round-trips.
    assert first.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x00>", "<0x0A>"]) == [0, 1, 2, 3, 13]
    assert first.convert_tokens_to_ids(["<image>", "<pad>"]) == [len(first) - 2, len(first) - 1]
    assert first.image_token == "<image>"
    for text in ("a man in a red shirt", "Café", "the dog on the left ☃"):
        ids = first.encode(text)
        assert ids[0] == first.bos_token_id
        assert first.decode(ids, skip_special_tokens=True) == text
    assert first.encode("USER: <image>\nhi", add_special_tokens=False).count(len(first) - 2) == 1

    first.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is type(first) and loaded.image_token == "<image>"
    assert loaded.encode("the dog on the left ☃") == first.encode("the dog on the left ☃")
