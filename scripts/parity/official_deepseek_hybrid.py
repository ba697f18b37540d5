"""The official F-LMM side of the parity probe for DeepSeek-VL 7B, the hybrid tower (probe venv; README.md).

As ``official_deepseek.py``, with the official ``HybridVisionTower`` in place of the plain SigLIP tower: the
official vendored ``deepseek_vl`` builds a SAM-B-style tower (``deepseek_vl/models/sam.py``: ViT, neck, the
two stride-2 ``downsamples`` and the ``neck_hd`` branch of the first global block, weighted by
``hd_alpha_downsamples``) at the high-res side and a timm SigLIP at the low-res side, each normalising its
own input, the low-res one resized from the high-res square inside the tower. Our tiny hybrid's weights are
loaded into it strictly (up to the towers' unused layer norms and SigLIP pool head).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch
from official_deepseek import merge_qkv, official_model, siglip_key
from official_llava import (
    install_stubs,
    run_official,
    tokenizer_439,
)
from torch import nn


def load_tiny_sam_source(official: Path, grid: int) -> None:
    """The official SAM tower resizes its neck output to a hard-coded 96 x 96 (4 x the release's 24-cell grid)
    before its two stride-2 convolutions: set to 4 x the tiny grid (two literal replacements, asserted)."""
    path = official / "deepseek_vl/models/sam.py"
    source = path.read_text()
    assert source.count("size=(96, 96)") == 2, "the official sam.py changed: check its resize"
    source = source.replace("size=(96, 96)", f"size=({4 * grid}, {4 * grid})")
    module = types.ModuleType("deepseek_vl.models.sam")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module
    exec(compile(source, str(path), "exec"), module.__dict__)


def deepseek_hybrid_439(lmm_dir: Path):
    """Our tiny DeepSeek-VL hybrid (transformers 5.x layout) as the official ``MultiModalityCausalLM``."""
    from functools import partial

    from deepseek_vl.models import sam, siglip_vit
    from deepseek_vl.models.modeling_vlm import MultiModalityCausalLM, MultiModalityConfig
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    raw = json.loads((lmm_dir / "config.json").read_text())
    processor = json.loads((lmm_dir / "processor_config.json").read_text())["image_processor"]
    vision, high, text = raw["vision_config"], raw["high_res_vision_config"], dict(raw["text_config"])
    text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]
    siglip_vit.SigLIP_MODEL_CONFIG["siglip_tiny"] = {
        "image_size": vision["image_size"],
        "patch_size": vision["patch_size"],
        "width": vision["hidden_size"],
        "layers": vision["num_hidden_layers"],
        "heads": vision["num_attention_heads"],
        "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"],
        "global_pool": "map",
        "use_checkpoint": False,
    }
    # The official table's sam_b_downsample entry, at the tiny sizes; create_sam_vit's hard-coded MLP ratio
    # (4) and window (14) are the release's, so the tower is rebuilt below with the tiny ones.
    sam.SAM_MODEL_CONFIG["sam_tiny"] = {
        "width": high["hidden_size"],
        "layers": high["num_hidden_layers"],
        "heads": high["num_attention_heads"],
        "global_attn_indexes": high["global_attn_indexes"],
        "downsample_channels": (2 * high["output_channels"], 4 * high["output_channels"]),
    }
    hidden = text["hidden_size"]
    output_dim = 4 * high["output_channels"]
    config = MultiModalityConfig(
        vision_config={
            "cls": "HybridVisionTower",
            "params": {
                "concat_type": "tuple",
                "freeze_high": True,
                "freeze_low": True,
                "high_res_cfg": {
                    "image_size": high["image_size"],
                    "model_name": "sam_tiny",
                    "output_dim": output_dim,
                    "pixel_mean": processor["high_res_image_mean"],
                    "pixel_std": processor["high_res_image_std"],
                    "select_feature": "same",
                    "select_layer": -1,
                },
                "low_res_cfg": {
                    "image_size": vision["image_size"],
                    "model_name": "siglip_tiny",
                    "output_dim": vision["hidden_size"],
                    "pixel_mean": processor["image_mean"],
                    "pixel_std": processor["image_std"],
                    "select_feature": "same",
                    "select_layer": -1,
                },
            },
        },
        aligner_config={
            "cls": "MlpProjector",
            "params": {
                "depth": 2,
                "input_dim": vision["hidden_size"],
                "n_embed": hidden,
                "projector_type": "low_high_hybrid_split_mlp_gelu",
            },
        },
        language_config=LlamaConfig(**text),
    )
    config.language_config._attn_implementation = "eager"
    model = MultiModalityCausalLM(config)
    model.vision_model.vision_tower_high.vision_tower = sam.ImageEncoderViT(
        img_size=high["image_size"],
        patch_size=high["patch_size"],
        embed_dim=high["hidden_size"],
        depth=high["num_hidden_layers"],
        num_heads=high["num_attention_heads"],
        mlp_ratio=high["mlp_dim"] / high["hidden_size"],
        out_chans=high["output_channels"],
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=high["window_size"],
        global_attn_indexes=tuple(high["global_attn_indexes"]),
        downsample_channels=(2 * high["output_channels"], 4 * high["output_channels"]),
    )
    high_tower, low_tower = "vision_model.vision_tower_high.vision_tower.", "vision_model.vision_tower_low."
    renamed = {
        "model.aligner.high_res_vision_proj.": "aligner.high_up_proj.",
        "model.aligner.vision_proj.": "aligner.low_up_proj.",
        "model.aligner.proj.": "aligner.layers.1.",
        "model.high_res_vision_neck.conv1.": high_tower + "neck_hd.0.",
        "model.high_res_vision_neck.layer_norm1.": high_tower + "neck_hd.1.",
        "model.high_res_vision_neck.conv2.": high_tower + "neck_hd.2.",
        "model.high_res_vision_neck.layer_norm2.": high_tower + "neck_hd.3.",
        "model.high_res_vision_proj.conv1.": high_tower + "downsamples.0.",
        "model.high_res_vision_proj.conv2.": high_tower + "downsamples.1.",
        "model.high_res_vision_alpha": high_tower + "hd_alpha_downsamples",
        "model.high_res_vision_model.vision_encoder.neck.conv1.": high_tower + "neck.0.",
        "model.high_res_vision_model.vision_encoder.neck.layer_norm1.": high_tower + "neck.1.",
        "model.high_res_vision_model.vision_encoder.neck.conv2.": high_tower + "neck.2.",
        "model.high_res_vision_model.vision_encoder.neck.layer_norm2.": high_tower + "neck.3.",
        "model.high_res_vision_model.vision_encoder.patch_embed.projection.": high_tower
        + "patch_embed.proj.",
        "model.high_res_vision_model.vision_encoder.layers.": high_tower + "blocks.",
        "model.high_res_vision_model.vision_encoder.": high_tower,
        "model.language_model.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
    }
    sam_block = {"layer_norm1": "norm1", "layer_norm2": "norm2"}
    state = {}
    for key, value in load_file(lmm_dir / "model.safetensors").items():
        if key.startswith("model.vision_model."):
            state.update(
                siglip_key(key.removeprefix("model.vision_model."), value, low_tower + "vision_tower.")
            )
            continue
        prefix = next((p for p in renamed if key.startswith(p)), None)
        if prefix is None:
            raise KeyError(key)
        new = renamed[prefix] + key[len(prefix) :]
        if prefix.endswith("vision_encoder.layers."):
            parts = new.split(".")
            parts = [sam_block.get(part, part) for part in parts]
            new = ".".join(parts)
        state[new] = value
    merge_qkv(state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # built but unused: the SigLIP attention-pool head (ignore_head=True), HybridVisionTower's layer norms
    assert not unexpected, unexpected
    assert all(".attn_pool." in key or "_layer_norm." in key for key in missing), missing
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--official", type=Path, required=True)
    parser.add_argument("--deps", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--sam-checkpoint", type=Path, required=True)
    args = parser.parse_args()
    sys.path[:0] = [str(args.official), str(args.deps)]
    install_stubs(args.deps)
    ours = torch.load(args.work / "ours.pt", weights_only=True)
    lmm_dir = Path(ours["lmm_dir"])
    processor_cfg = json.loads((lmm_dir / "processor_config.json").read_text())
    grid = int(processor_cfg["num_image_tokens"] ** 0.5)
    load_tiny_sam_source(args.official, grid)
    from deepseek_vl.models.image_processing_vlm import VLMImageProcessor
    from flmm.models.frozen_deepseek_vl import FrozenDeepseekVLSAM

    lmm = deepseek_hybrid_439(lmm_dir)
    tokenizer = tokenizer_439(lmm_dir, args.work)
    image_cfg = processor_cfg["image_processor"]
    # The release's processor for the hybrid: the high-res side, padded in its mean colour, rescaled to [0, 1]
    # only (each tower normalises its own input: pixel_mean / pixel_std of its config).
    image_processor = VLMImageProcessor(
        image_size=image_cfg["high_res_size"]["height"],
        min_size=image_cfg["min_size"],
        image_mean=image_cfg["high_res_image_mean"],
        image_std=image_cfg["high_res_image_std"],
        do_normalize=False,
    )

    model, prompt_ids = official_model(FrozenDeepseekVLSAM, lmm, tokenizer, grid, ours, args)

    def preprocess(image):
        processed = image_processor.preprocess(image)
        return torch.from_numpy(processed["pixel_values"][0]), processed["meta_datas"][0]

    # Both towers' inputs (after each one's normalisation, the low-res one resized in the tower) are recorded
    # as the official pixels; the crossed run gets our high-res square, un-normalised (the tower's input).
    tower_inputs = {"low": [], "high": []}
    vision = lmm.vision_model
    vision.vision_tower_low.vision_tower.register_forward_pre_hook(
        lambda module, inputs: tower_inputs["low"].append(inputs[0][0])
    )
    vision.vision_tower_high.vision_tower.register_forward_pre_hook(
        lambda module, inputs: tower_inputs["high"].append(inputs[0][0])
    )
    mean = torch.tensor(image_cfg["high_res_image_mean"])[:, None, None]
    std = torch.tensor(image_cfg["high_res_image_std"])[:, None, None]
    crossed = {
        **ours,
        "cases": [
            {**case, "pixel_values": case["high_res_pixel_values"] * std + mean} for case in ours["cases"]
        ],
    }
    run_official(model, crossed, tokenizer, prompt_ids, preprocess, args.work)
    official = torch.load(args.work / "official.pt", weights_only=False)
    for index, case in enumerate(official["cases"]):
        case["pixel_values"] = tower_inputs["low"][2 * index]  # official run, then crossed
        case["high_res_pixel_values"] = tower_inputs["high"][2 * index]
    torch.save(official, args.work / "official.pt")


if __name__ == "__main__":
    main()
