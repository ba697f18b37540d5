"""InternVL3, LLaVA-OneVision and Gemma 3 on their tiny variants: where each family's image tokens land on the
grid, what its read-out takes, and chat and predict through a checkpoint of each; what every family does
(fused = eager, context limit, a training step, the demo) is in test_lmm_families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides
from rich.console import Console
from samples import make_sample, png_like

from flmm_lightning.assets import (
    ensure_tiny_gemma3,
    ensure_tiny_internvl,
    ensure_tiny_llava_onevision,
    tiny_gemma3_config,
)
from flmm_lightning.chat import chat
from flmm_lightning.lmm.gemma3 import Gemma3Adapter, Gemma3PromptBuilder
from flmm_lightning.lmm.internvl import InternVLAdapter, InternVLPromptBuilder
from flmm_lightning.lmm.llava_onevision import LlavaOnevisionAdapter, LlavaOnevisionPromptBuilder
from flmm_lightning.predict import predict
from flmm_lightning.runs.build import build_module, run_config

pytestmark = pytest.mark.usefixtures("pinned_threads")

WIDE = make_sample(100, 150, ["a man in a red shirt", "the dog on the left", "Café"], 0)
TALL = png_like(230, 90)
SQUARE = make_sample(120, 120, ["the shape"], 1)


def eager_image_attention(adapter, batch, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own eager attentions of the one sample in ``batch``, per object (mean over its tokens):
    ``[n, L*H, N]`` over the image-token columns (layer-major), and those columns' sequence positions."""
    outputs = adapter.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        **adapter._pixel_inputs(batch, batch.input_ids == image_token_id, torch.device("cpu")),
        output_attentions=True,
    )
    columns = (batch.input_ids[0] == image_token_id).nonzero().flatten()
    objects = []
    for k in range(int(batch.mask_ids.max()) + 1):
        rows = (batch.mask_ids[0] == k).nonzero().flatten()
        objects.append(
            torch.cat([attn[0][:, rows][:, :, columns].mean(dim=1) for attn in outputs.attentions])
        )
    return torch.stack(objects), columns


# ---------------------------------------------------------------------------------------------- InternVL
@pytest.fixture(scope="module")
def internvl():
    tiny_dir = ensure_tiny_internvl()
    adapter = InternVLAdapter(tiny_dir, text_proj_dim=8, capture="eager", torch_dtype="float32")
    return InternVLPromptBuilder(tiny_dir), adapter


def test_internvl_pixel_shuffle_keeps_each_token_on_its_own_2x2_patch_block(internvl):
    """The tile read-out assumes a tile's tokens are the row-major cells of the shuffled patch grid."""
    _, adapter = internvl
    side = 8
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    patches = torch.stack([rows, cols], dim=-1).float()[None]  # [1, 8, 8, 2]: each patch's own (row, col)
    shuffled = adapter.model.model.pixel_shuffle(patches, scale_factor=0.5)  # [1, 4, 4, 8]
    for i in range(side // 2):
        for j in range(side // 2):
            features = shuffled[0, i, j].view(-1, 2)  # the 4 patches merged into token (i, j)
            assert set(features[:, 0].tolist()) == {2 * i, 2 * i + 1}
            assert set(features[:, 1].tolist()) == {2 * j, 2 * j + 1}


@pytest.mark.parametrize("sample", [WIDE, TALL, SQUARE], ids=["two_tiles", "three_tiles", "one_tile"])
def test_internvl_tiles_make_one_grid_with_the_thumbnail_resized_onto_it(internvl, sample):
    builder, adapter = internvl
    prompt = builder(sample)
    rows, columns = builder.tile_grid(sample.image.height, sample.image.width)
    t = adapter.tile_cells
    tiles = rows * columns
    assert prompt.grid_hw == (rows * t, columns * t)
    assert prompt.pixel_inputs["pixel_values"].shape[0] == tiles + (tiles > 1)  # thumbnail last
    batch = builder.collate([prompt])
    with torch.no_grad():
        features = adapter(batch)[0]
        maps, _ = eager_image_attention(adapter, batch, adapter.image_token_id)  # [n, L*H, N]
    h, w = prompt.grid_hw
    # Grid cell (y, x) lies in tile (y // t, x // t), at (y % t, x % t) inside it.
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    token = ((ys // t) * columns + xs // t) * t * t + (ys % t) * t + xs % t  # [h, w]
    tiled = maps[:, :, token]  # [n, L*H, h, w]
    if tiles == 1:
        thumbnail = tiled
    else:
        thumbnail = F.interpolate(
            maps[:, :, tiles * t * t :].reshape(*maps.shape[:2], t, t), size=(h, w), mode="bilinear"
        )
    expected = torch.cat([thumbnail, tiled], dim=1)
    assert features.attention_maps.shape == (sample.num_objects, adapter.attention_channels, h, w)
    torch.testing.assert_close(features.attention_maps, expected, rtol=0, atol=1e-6)


def test_internvl_tiles_are_the_stretched_image_cut_in_row_major_order(internvl):
    builder, _ = internvl
    image_processor = builder.processor.image_processor
    side = image_processor.size["height"]
    sample = make_sample(100, 230, ["the shape"], 4)  # a wide image: 1 row of 2 or more tiles
    rows, columns = builder.tile_grid(sample.image.height, sample.image.width)
    assert rows == 1 < columns
    tiles = builder(sample).pixel_inputs["pixel_values"]  # [tiles + thumbnail, 3, side, side]
    stretched = image_processor(
        images=[sample.image], crop_to_patches=False, size={"height": rows * side, "width": columns * side}
    )["pixel_values"][0]  # [3, rows*side, columns*side]
    for k in range(rows * columns):
        r, c = divmod(k, columns)
        crop = stretched[:, r * side : (r + 1) * side, c * side : (c + 1) * side]
        torch.testing.assert_close(tiles[k], crop, rtol=0, atol=1e-5)


def test_internvl_max_tiles_caps_the_image_tokens(internvl):
    builder, _ = internvl
    tiny_dir = builder.pretrained
    one = InternVLPromptBuilder(tiny_dir, max_tiles=1)(WIDE)
    image_token = builder.processor.image_token_id
    assert one.grid_hw == (4, 4) and (one.input_ids == image_token).sum() == 16
    assert (builder(WIDE).input_ids == image_token).sum() == 3 * 16  # 2 tiles + thumbnail
    with pytest.raises(ValueError, match="max_tiles=0"):
        InternVLPromptBuilder(tiny_dir, max_tiles=0)(WIDE)


# ---------------------------------------------------------------------------------------------- OneVision
def test_onevision_reads_a_pooled_anyres_grid_like_llava_next():
    """A 600x600 image takes 6x6 crops (48x48 cells); anyres_max_9 pools them to 24x24 inside the model."""
    tiny_dir = ensure_tiny_llava_onevision()
    builder = LlavaOnevisionPromptBuilder(tiny_dir)
    adapter = LlavaOnevisionAdapter(tiny_dir, text_proj_dim=8, capture="eager", torch_dtype="float32")
    sample = make_sample(600, 600, ["the shape"], 2)
    prompt = builder(sample)
    cells_per_side = 112 // 14
    assert prompt.grid_hw == (24, 24)
    h, w = prompt.grid_hw
    assert (prompt.input_ids == builder.processor.image_token_id).sum() == cells_per_side**2 + h * (w + 1)
    batch = builder.collate([prompt])
    with torch.no_grad():
        features = adapter(batch)[0]
        maps, _ = eager_image_attention(adapter, batch, adapter.image_token_id)
    base_tokens = cells_per_side**2
    base = maps[:, :, :base_tokens].reshape(*maps.shape[:2], cells_per_side, cells_per_side)
    base = F.interpolate(base, size=(h, w), mode="bilinear")
    anyres = maps[:, :, base_tokens:].reshape(*maps.shape[:2], h, w + 1)[..., :w]
    torch.testing.assert_close(features.attention_maps, torch.cat([base, anyres], dim=1), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- Gemma 3
@pytest.fixture(scope="module")
def gemma3():
    tiny_dir = ensure_tiny_gemma3()
    adapter = Gemma3Adapter(tiny_dir, text_proj_dim=8, capture="fused", torch_dtype="float32")
    return Gemma3PromptBuilder(tiny_dir), adapter


def test_gemma3_prompt_has_one_bos_and_the_image_between_its_markers(gemma3):
    builder, _ = gemma3
    prompt = builder(WIDE)
    tokenizer = builder.processor.tokenizer
    ids = prompt.input_ids
    assert ids[0] == tokenizer.bos_token_id and (ids == tokenizer.bos_token_id).sum() == 1
    image = (ids == tokenizer.image_token_id).nonzero().flatten()
    assert len(image) == 64 and torch.all(image[1:] - image[:-1] == 1)
    assert ids[image[0] - 1] == tokenizer.boi_token_id and ids[image[-1] + 1] == tokenizer.eoi_token_id
    assert prompt.grid_hw == (8, 8) and prompt.content_box == (0, 0, *prompt.padded_hw)


def test_gemma3_local_layers_lose_image_tokens_beyond_the_window(gemma3):
    """Phrase tokens more than ``sliding_window`` positions after an image token give it zero attention in the
    sliding-window layers and not in the global layer, in the fused capture as in the model."""
    builder, adapter = gemma3
    text = adapter.model.config.text_config
    window, layer_types = text.sliding_window, text.layer_types
    prompt = builder(WIDE)
    batch = builder.collate([prompt])
    with torch.no_grad():
        maps = adapter(batch)[0].attention_maps  # [n, L*H, 8, 8]
    image = (prompt.input_ids == adapter.image_token_id).nonzero().flatten()  # [N]
    per_layer = maps.reshape(maps.shape[0], len(layer_types), adapter.num_heads, -1)  # [n, L, H, N]
    for k in range(WIDE.num_objects):
        first_token = int((prompt.mask_ids == k).nonzero().min())
        hidden = first_token - image >= window  # [N]: out of every one of the object's tokens' windows
        assert hidden.any() and not hidden.all()
        for layer, kind in enumerate(layer_types):
            if kind == "sliding_attention":
                assert torch.all(per_layer[k, layer][:, hidden] == 0)
                assert torch.all(per_layer[k, layer][:, ~hidden] > 0)
            else:
                assert torch.all(per_layer[k, layer] > 0)


def test_gemma3_refuses_soft_capped_attention():
    config = tiny_gemma3_config()
    config.text_config.attn_logit_softcapping = 50.0
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
        Gemma3Adapter(config, text_proj_dim=8, torch_dtype="float32")


# ---------------------------------------------------------------------------------------------- chat, predict
@pytest.fixture(scope="module", params=["tiny_internvl", "tiny_llava_onevision", "tiny_gemma3"])
def family_checkpoint(request, compose_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained demo model of the family (with its keyword selector), saved as training saves it."""
    root = tmp_path_factory.mktemp(request.param)
    cfg = compose_config([*tiny_overrides(root / "data", root / "run"), f"model={request.param}"])
    torch.manual_seed(0)
    module = build_module(cfg)
    path = root / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "flmm_config": run_config(cfg)}, path)
    return path


def test_predict_and_chat_run_on_the_family(family_checkpoint, compose_config, tmp_path):
    photo = tmp_path / "shapes.png"
    make_sample(90, 130, [], 3).image.save(photo)
    phrases = ["the red circle", "the blue square"]
    overrides = [f"ckpt={family_checkpoint}", f"image={photo}", "device=cpu"]
    overlay_path, json_path = predict(
        compose_config(
            [*overrides, f"phrases=[{', '.join(phrases)}]", f"paths.output_dir={tmp_path / 'predict'}"],
            config_name="predict",
        )
    )
    objects = json.loads(json_path.read_text())["objects"]
    assert [record["phrase"] for record in objects] == phrases and overlay_path.is_file()

    question = "What is in the image?"
    chat_dir = tmp_path / "chat"
    cfg = compose_config(
        [
            *overrides,
            f"paths.output_dir={chat_dir}",
            f"question='{question}'",
            "generation.max_new_tokens=8",
            "threshold=0.0",
        ],
        config_name="chat",
    )
    (turn,) = chat(cfg, None, Console(record=True, width=200))
    record = json.loads((chat_dir / "turn_01.json").read_text())
    assert record["question"] == question and record["answer"] == turn.answer
    assert len(record["phrases"]) == len(turn.phrases)
    # Threshold 0: every word of the answer is a phrase (random weights: tiny Gemma 3 answers blank lines),
    # each with a mask at the image's size.
    assert turn.phrases or not turn.answer.strip()
    assert all(phrase.mask.shape == (90, 130) for phrase in turn.phrases)
