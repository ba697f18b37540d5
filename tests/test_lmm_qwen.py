"""Qwen2-VL prompt building with the real tokenizer, and the adapter's frozen/trainable split and outputs."""

from __future__ import annotations

import pickle

import pytest
import torch
from samples import make_sample, png_like

from flmm_lightning.boundaries import GroundingFeatures, LMMBatch, PromptInputs
from flmm_lightning.lmm.qwen2_vl import Qwen2VLAdapter, Qwen2VLPromptBuilder

IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653


REFCOCO_LIKE = make_sample(100, 150, ["a man in a red shirt", "the dog on the left", "Café"], 0)
PNG_LIKE = png_like(180, 90)


@pytest.fixture(scope="module")
def builder(tiny_qwen_dir):
    return Qwen2VLPromptBuilder(tiny_qwen_dir)


@pytest.fixture(scope="module")
def adapter(tiny_qwen_dir):
    return Qwen2VLAdapter(tiny_qwen_dir, text_proj_dim=32, capture="fused", torch_dtype="float32")


@pytest.mark.parametrize("sample", [REFCOCO_LIKE, PNG_LIKE], ids=["refcoco", "png"])
def test_prompt_tokens(builder, sample):
    prompt = builder(sample)
    assert isinstance(prompt, PromptInputs)
    tokenizer = builder.processor.tokenizer
    ids, mask_ids = prompt.input_ids, prompt.mask_ids
    assert ids.shape == mask_ids.shape and ids.dtype == mask_ids.dtype == torch.long

    for k, phrase in enumerate(sample.phrases):
        assert tokenizer.decode(ids[mask_ids == k]).strip() == phrase.strip()

    image_positions = (ids == IMAGE_PAD).nonzero().flatten()
    grid_h, grid_w = prompt.grid_hw
    assert image_positions.numel() == grid_h * grid_w
    assert ids[image_positions[0] - 1] == VISION_START and ids[image_positions[-1] + 1] == VISION_END
    assert torch.all(image_positions[1:] - image_positions[:-1] == 1)
    assert (mask_ids >= 0).nonzero().min() > image_positions.max()

    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert "Please give me a description of the image.<|im_end|>\n<|im_start|>assistant\n" in text


def test_prompt_geometry(builder):
    prompt = builder(REFCOCO_LIKE)
    thw = prompt.pixel_inputs["image_grid_thw"]
    assert thw.shape == (1, 3)
    _, grid_h, grid_w = thw[0].tolist()
    assert prompt.grid_hw == (grid_h // 2, grid_w // 2)
    assert prompt.padded_hw == (grid_h * 14, grid_w * 14)
    assert prompt.content_box == (0, 0, grid_h * 14, grid_w * 14)
    assert prompt.pixel_inputs["pixel_values"].shape[0] == grid_h * grid_w


def test_refcoco_separators_are_ungrounded_dots(builder):
    prompt = builder(REFCOCO_LIKE)
    tokenizer = builder.processor.tokenizer
    dot = tokenizer.encode(".", add_special_tokens=False)
    start = (prompt.mask_ids >= 0).nonzero().min()
    tail_ids, tail_mask = prompt.input_ids[start:], prompt.mask_ids[start:]
    assert tail_ids[tail_mask == -1].tolist() == dot * REFCOCO_LIKE.num_objects


def test_max_pixels_shrinks_grid(tiny_qwen_dir):
    small = Qwen2VLPromptBuilder(tiny_qwen_dir, max_pixels=56 * 56, min_pixels=28 * 28)
    assert small(REFCOCO_LIKE).grid_hw == (1, 2)


def test_phrase_without_tokens_names_the_sample(builder):
    sample = make_sample(64, 64, ["a cat", ""], 42)
    with pytest.raises(ValueError, match=r"sample 42 \(img_42\.jpg\).*\[1\]"):
        builder(sample)


def test_builder_pickles_without_processor(builder):
    builder(REFCOCO_LIKE)
    clone = pickle.loads(pickle.dumps(builder))
    assert clone._processor is None
    assert torch.equal(clone(REFCOCO_LIKE).input_ids, builder(REFCOCO_LIKE).input_ids)


def test_collate_pads_right(builder):
    prompts = [builder(REFCOCO_LIKE), builder(PNG_LIKE)]
    batch = builder.collate(prompts)
    assert isinstance(batch, LMMBatch)
    lengths = [p.input_ids.numel() for p in prompts]
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.mask_ids.shape == (2, max(lengths))
    pad_id = builder.processor.tokenizer.pad_token_id
    for b, (p, length) in enumerate(zip(prompts, lengths, strict=True)):
        assert torch.equal(batch.input_ids[b, :length], p.input_ids)
        assert torch.all(batch.input_ids[b, length:] == pad_id)
        assert batch.attention_mask[b].sum() == length
        assert torch.all(batch.mask_ids[b, length:] == -1)
    assert batch.pixel_inputs["pixel_values"].shape[0] == sum(
        p.pixel_inputs["pixel_values"].shape[0] for p in prompts
    )
    assert batch.pixel_inputs["image_grid_thw"].shape == (2, 3)
    assert batch.grid_hw == [p.grid_hw for p in prompts]


def test_adapter_frozen_and_eval(adapter):
    assert adapter.attention_channels == 16
    assert all(not p.requires_grad for p in adapter.model.parameters())
    trainable = {name for name, p in adapter.named_parameters() if p.requires_grad}
    assert trainable == {"text_layer_weights", "text_proj.weight", "text_proj.bias"}
    adapter.train()
    assert adapter.training and not adapter.model.training
    assert not any(m.training for m in adapter.model.modules())
    adapter.eval()


def test_adapter_outputs_and_gradients(builder, adapter):
    samples = [REFCOCO_LIKE, PNG_LIKE]
    prompts = [builder(s) for s in samples]
    adapter.train()
    features = adapter(builder.collate(prompts))
    assert len(features) == 2
    for f, s, p in zip(features, samples, prompts, strict=True):
        assert isinstance(f, GroundingFeatures)
        assert f.attention_maps.shape == (s.num_objects, 16, *p.grid_hw)
        assert len(f.text_embeddings) == s.num_objects
        for k, emb in enumerate(f.text_embeddings):
            assert emb.shape == (int((p.mask_ids == k).sum()), 32)
        assert f.padded_hw == p.padded_hw and f.content_box == p.content_box

    loss = sum(e.pow(2).sum() for f in features for e in f.text_embeddings)
    loss.backward()
    assert adapter.text_layer_weights.grad is not None and adapter.text_layer_weights.grad.abs().sum() > 0
    assert adapter.text_proj.weight.grad is not None and adapter.text_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in adapter.model.parameters())
    adapter.zero_grad(set_to_none=True)
    adapter.eval()


def test_merge_max_bounds_mean(tiny_qwen_dir, builder, adapter):
    batch = builder.collate([builder(REFCOCO_LIKE)])
    maxed = Qwen2VLAdapter(tiny_qwen_dir, text_proj_dim=32, merge="max", torch_dtype="float32")
    mean_maps = adapter(batch)[0].attention_maps
    max_maps = maxed(batch)[0].attention_maps
    assert torch.all(max_maps >= mean_maps - 1e-6) and torch.any(max_maps > mean_maps + 1e-6)


def test_adapter_rejects_bad_options(tiny_qwen_dir):
    with pytest.raises(ValueError, match="merge"):
        Qwen2VLAdapter(tiny_qwen_dir, text_proj_dim=8, merge="sum")
    with pytest.raises(ValueError, match="torch_dtype"):
        Qwen2VLAdapter(tiny_qwen_dir, text_proj_dim=8, torch_dtype="float16")


@pytest.mark.slow
def test_use_fast_picks_the_image_processor(tiny_qwen_dir):
    from transformers.image_processing_backends import PilBackend, TorchvisionBackend

    # default: the PIL ("slow") processor the reference's transformers used
    assert isinstance(Qwen2VLPromptBuilder(tiny_qwen_dir).processor.image_processor, PilBackend)
    fast = Qwen2VLPromptBuilder(tiny_qwen_dir, use_fast=True)
    assert isinstance(fast.processor.image_processor, TorchvisionBackend)
    # both give the same patch grid; the pixels differ by round-off and resampling
    slow_prompt, fast_prompt = Qwen2VLPromptBuilder(tiny_qwen_dir)(REFCOCO_LIKE), fast(REFCOCO_LIKE)
    assert torch.equal(slow_prompt.input_ids, fast_prompt.input_ids)
    assert slow_prompt.grid_hw == fast_prompt.grid_hw


def test_trailing_space_is_a_token_of_the_phrase(builder):
    """RefCOCO sentences keep their whitespace (mmdet only lower-cases them): the reference encodes each
    sentence alone, so a trailing space is one more token of the phrase (Qwen2's " ")."""
    sample = make_sample(100, 150, ["man on left "], 7)
    prompt = builder(sample)
    tokenizer = builder.processor.tokenizer
    phrase_ids = prompt.input_ids[prompt.mask_ids == 0].tolist()
    assert phrase_ids == tokenizer.encode("man on left ", add_special_tokens=False)
    assert phrase_ids[-1:] == tokenizer.encode(" ", add_special_tokens=False)
    assert phrase_ids[:-1] == tokenizer.encode("man on left", add_special_tokens=False)
