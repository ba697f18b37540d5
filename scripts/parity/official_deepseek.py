"""The official F-LMM side of the parity probe for DeepSeek-VL 1.3B (probe venv; see README.md).

As ``official_llava.py``: reads ``<work>/ours.pt``, builds the official ``MultiModalityCausalLM`` (the
official repository's vendored ``deepseek_vl``: timm SigLIP + LLaMA, transformers 4.39) on our tiny
weights and the official ``FrozenDeepseekVLSAM`` around it, runs its data transform and forward on the same
photos and phrases, writes every stage to ``<work>/official.pt`` and its state dict to
``<work>/official_state_dict.pth``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from official_llava import (
    install_stubs,
    load_sam_wrapper,
    load_unet_head,
    official_names,
    run_official,
    tiny_sam_official,
    tokenizer_439,
)
from torch import nn


def deepseek_439(lmm_dir: Path):
    """Our tiny DeepSeek-VL (transformers 5.x layout) as the official ``MultiModalityCausalLM``."""
    from deepseek_vl.models import siglip_vit
    from deepseek_vl.models.modeling_vlm import MultiModalityCausalLM, MultiModalityConfig
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    raw = json.loads((lmm_dir / "config.json").read_text())
    vision, text = raw["vision_config"], dict(raw["text_config"])
    text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]
    # The official SigLIP table knows the release sizes only: the tiny tower is added under its own name.
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
    hidden = text["hidden_size"]
    config = MultiModalityConfig(
        vision_config={
            "cls": "CLIPVisionTower",
            "params": {
                "image_size": vision["image_size"],
                "model_name": "siglip_tiny",
                "select_feature": "same",
                "select_layer": -1,
            },
        },
        aligner_config={
            "cls": "MlpProjector",
            "params": {
                "depth": 2,
                "input_dim": vision["hidden_size"],
                "n_embed": hidden,
                "projector_type": "mlp_gelu",
            },
        },
        language_config=LlamaConfig(**text),
    )
    config.language_config._attn_implementation = "eager"
    model = MultiModalityCausalLM(config)
    state = {}
    for key, value in load_file(lmm_dir / "model.safetensors").items():
        if key == "lm_head.weight":
            state["language_model.lm_head.weight"] = value
        elif key.startswith("model.language_model."):
            state["language_model.model." + key.removeprefix("model.language_model.")] = value
        elif key.startswith("model.aligner.linear"):
            index = {"1": "0", "2": "2"}[key[len("model.aligner.linear")]]
            state[f"aligner.layers.{index}." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("model.vision_model."):
            state.update(siglip_key(key.removeprefix("model.vision_model."), value))
        else:
            raise KeyError(key)
    merge_qkv(state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # the SigLIP attention-pool head is built but unused (ignore_head=True): its features skip it
    assert not unexpected and all(".attn_pool." in key for key in missing), (missing, unexpected)
    return model.eval()


def merge_qkv(state: dict[str, torch.Tensor]) -> None:
    """timm's SigLIP keeps q, k and v in one ``attn.qkv`` (concatenated on dim 0): merged in place."""
    qkv = {}
    for key in [k for k in state if ".attn.q." in k or ".attn.k." in k or ".attn.v." in k]:
        qkv.setdefault(
            key.replace(".attn.q.", ".attn.@.")
            .replace(".attn.k.", ".attn.@.")
            .replace(".attn.v.", ".attn.@."),
            {},
        )[key.split(".attn.")[1][0]] = state.pop(key)
    for key, parts in qkv.items():
        state[key.replace(".attn.@.", ".attn.qkv.")] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)


def siglip_key(
    key: str, value: torch.Tensor, tower: str = "vision_model.vision_tower."
) -> dict[str, torch.Tensor]:
    if key == "embeddings.patch_embedding.weight" or key == "embeddings.patch_embedding.bias":
        return {tower + "patch_embed.proj." + key.rsplit(".", 1)[1]: value}
    if key == "embeddings.position_embedding.weight":
        return {tower + "pos_embed": value[None]}
    if key.startswith("post_layernorm."):
        return {tower + "norm." + key.rsplit(".", 1)[1]: value}
    layer, rest = key.removeprefix("encoder.layers.").split(".", 1)
    renamed = {
        "layer_norm1": "norm1",
        "layer_norm2": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "self_attn.out_proj": "attn.proj",
        "self_attn.q_proj": "attn.q",
        "self_attn.k_proj": "attn.k",
        "self_attn.v_proj": "attn.v",
    }
    module, param = rest.rsplit(".", 1)
    return {f"{tower}blocks.{layer}.{renamed[module]}.{param}": value}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--official", type=Path, required=True)
    parser.add_argument("--deps", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--sam-checkpoint", type=Path, required=True)
    args = parser.parse_args()
    sys.path[:0] = [str(args.official), str(args.deps)]
    install_stubs(args.deps)
    from deepseek_vl.models.image_processing_vlm import VLMImageProcessor
    from flmm.models.frozen_deepseek_vl import FrozenDeepseekVLSAM

    ours = torch.load(args.work / "ours.pt", weights_only=True)
    lmm_dir = Path(ours["lmm_dir"])
    lmm = deepseek_439(lmm_dir)
    tokenizer = tokenizer_439(lmm_dir, args.work)
    processor_cfg = json.loads((lmm_dir / "processor_config.json").read_text())
    image_cfg = processor_cfg["image_processor"]
    image_processor = VLMImageProcessor(
        image_size=image_cfg["size"]["height"],
        min_size=image_cfg["min_size"],
        image_mean=image_cfg["image_mean"],
        image_std=image_cfg["image_std"],
    )
    grid = int(processor_cfg["num_image_tokens"] ** 0.5)

    model, prompt_ids = official_model(FrozenDeepseekVLSAM, lmm, tokenizer, grid, ours, args)

    def preprocess(image):
        processed = image_processor.preprocess(image)
        return torch.from_numpy(processed["pixel_values"][0]), processed["meta_datas"][0]

    run_official(model, ours, tokenizer, prompt_ids, preprocess, args.work)


def official_model(model_class, lmm, tokenizer, grid: int, ours: dict, args: argparse.Namespace):
    """The official ``FrozenDeepseekVLSAM`` around ``lmm`` (built with ``__new__``, given what its constructor
    would build from the configs), our trainable weights under the official names, its state dict written to
    the work folder; and the grounding prompt's token ids."""
    model = model_class.__new__(model_class)
    nn.Module.__init__(model)
    model.deepseek_vl = lmm
    model.image_token_idx = tokenizer.encode("<image_placeholder>", add_special_tokens=False)[-1]
    model.merge = "mean"
    model.patch_size = 16
    model.clip_shape = grid  # hard-coded 24 (384 px) in the official code: the tiny grid here
    language = lmm.config.language_config
    unet_head, interp_conv = load_unet_head(args.official, args.deps)
    model.mask_head = unet_head(
        normalize_input=True,
        upsample_input=64,
        in_channels=language.num_hidden_layers * language.num_attention_heads,
        base_channels=64,
        num_stages=4,
        strides=(1, 1, 1, 1),
        enc_num_convs=(2, 2, 2, 2),
        dec_num_convs=(2, 2, 2),
        downsamples=(True, True, True),
        enc_dilations=(1, 1, 1, 1),
        dec_dilations=(1, 1, 1),
        norm_cfg=dict(type=nn.GroupNorm, num_groups=1),
        upsample_cfg=dict(type=interp_conv),
    )
    model.sam = sam_wrapper_for(load_sam_wrapper(args.official, mask_input_size=64), args.sam_checkpoint)
    model.text_proj = nn.Linear(language.hidden_size, model.sam.model.prompt_encoder.embed_dim)
    model.text_layer_weights = nn.Parameter(torch.ones(language.num_hidden_layers))
    missing, unexpected = model.load_state_dict(official_names(ours["trainable"]), strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith(("deepseek_vl.", "sam.model.image_encoder.")) for k in missing), missing
    model.eval()
    torch.save(model.state_dict(), args.work / "official_state_dict.pth")

    template = {"INSTRUCTION": "User: {input}\n\nAssistant:"}  # configs/deepseek_vl/*.py (SYSTEM='')
    prompt = "<image_placeholder>" * (grid * grid) + "Please give me a description of the image."
    prompt_ids = tokenizer.encode(template["INSTRUCTION"].format(input=prompt), add_special_tokens=True)

    return model, prompt_ids


def sam_wrapper_for(sam_wrapper, checkpoint: Path):
    from segment_anything.utils.transforms import ResizeLongestSide

    sam = sam_wrapper.__new__(sam_wrapper)
    nn.Module.__init__(sam)
    sam.model = tiny_sam_official()
    sam.model.load_state_dict(torch.load(checkpoint, weights_only=True), strict=True)
    sam.transform = ResizeLongestSide(sam.model.image_encoder.img_size)
    sam.use_text, sam.use_mask, sam.use_box, sam.multimask_output = True, True, True, False
    return sam


if __name__ == "__main__":
    main()
