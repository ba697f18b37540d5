"""The official F-LMM side of the parity probe for LLaVA-NeXT (probe venv; see README.md).

As ``official_llava.py``, with the official ``CustomLlavaNextForConditionalGeneration`` (transformers 4.39),
``CustomLlavaNextImageProcessor`` and ``FrozenLlavaNextSAM`` (its U-Net reads 2 x layers x heads channels:
the base image's grid and the any-res grid, both resized to the any-res grid).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from official_deepseek import sam_wrapper_for
from official_llava import (
    install_stubs,
    load_sam_wrapper,
    load_unet_head,
    official_names,
    run_official,
    tokenizer_439,
)
from torch import nn


def llava_next_439(lmm_dir: Path):
    from llava.modeling_llava_next import CustomLlavaNextForConditionalGeneration
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    raw = json.loads((lmm_dir / "config.json").read_text())
    text = dict(raw["text_config"])
    text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**raw["vision_config"]),
        text_config=LlamaConfig(**text),
        image_token_index=raw["image_token_index"],
        pad_token_id=raw["pad_token_id"],
        vision_feature_layer=raw["vision_feature_layer"],
        vision_feature_select_strategy=raw["vision_feature_select_strategy"],
        projector_hidden_act=raw["projector_hidden_act"],
        image_grid_pinpoints=raw["image_grid_pinpoints"],
    )
    config._attn_implementation = "eager"
    model = CustomLlavaNextForConditionalGeneration(config)
    state = {}
    for key, value in load_file(lmm_dir / "model.safetensors").items():
        if key.startswith("vision_tower."):
            key = "vision_tower.vision_model." + key.removeprefix("vision_tower.")
        state[key] = value
    model.load_state_dict(state, strict=True)
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
    from flmm.datasets.llava_next_processors import CustomLlavaNextImageProcessor
    from flmm.models.frozen_llava_next import FrozenLlavaNextSAM
    from xtuner.utils.templates import PROMPT_TEMPLATE

    unet_head, interp_conv = load_unet_head(args.official, args.deps)
    sam_wrapper = load_sam_wrapper(args.official, mask_input_size=64)
    ours = torch.load(args.work / "ours.pt", weights_only=True)
    lmm_dir = Path(ours["lmm_dir"])
    llava = llava_next_439(lmm_dir)
    tokenizer = tokenizer_439(lmm_dir, args.work)
    processor_cfg = json.loads((lmm_dir / "processor_config.json").read_text())["image_processor"]
    image_processor = CustomLlavaNextImageProcessor(
        **{k: v for k, v in processor_cfg.items() if k != "image_processor_type"}
    )

    model = FrozenLlavaNextSAM.__new__(FrozenLlavaNextSAM)
    nn.Module.__init__(model)
    model.llava = llava
    text = llava.config.text_config
    model.mask_head = unet_head(
        normalize_input=True,
        upsample_input=64,
        in_channels=2 * text.num_hidden_layers * text.num_attention_heads,
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
    model.patch_size = llava.config.vision_config.patch_size
    model.merge = "mean"
    model.text_layer_weights = nn.Parameter(torch.ones(text.num_hidden_layers))
    model.sam = sam_wrapper_for(sam_wrapper, args.sam_checkpoint)
    model.text_proj = nn.Linear(text.hidden_size, model.sam.model.prompt_encoder.embed_dim)
    missing, unexpected = model.load_state_dict(official_names(ours["trainable"]), strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith(("llava.", "sam.model.image_encoder.")) for k in missing), missing
    model.eval()
    torch.save(model.state_dict(), args.work / "official_state_dict.pth")

    template = PROMPT_TEMPLATE.vicuna
    prompt_text = "<image>\nPlease give me a description of the image."
    prompt_ids = tokenizer.encode(template["INSTRUCTION"].format(input=prompt_text), add_special_tokens=True)

    def preprocess(image):
        processed = image_processor.preprocess(image)
        extra = {"image_sizes": torch.tensor(processed["image_sizes"][0])}
        return torch.from_numpy(processed["pixel_values"][0]), processed["meta_datas"][0], extra

    run_official(model, ours, tokenizer, prompt_ids, preprocess, args.work)


if __name__ == "__main__":
    main()
