"""The official F-LMM side of the parity probe for LLaVA-1.5 (run with the probe venv, see README.md).

Reads ``<work>/ours.pt`` (our tiny weights, trainable heads, inputs and every stage), builds the official
``CustomLlavaForConditionalGeneration`` (transformers 4.39) on the same LMM weights and the official
``FrozenLlavaSAM`` around it (its U-Net ``UNetHead`` and ``SAMWrapper`` on our heads' weights, loaded through
its own state-dict names), runs its data transform and forward on the same photos and phrases, and writes
every stage to ``<work>/official.pt``. Also writes the official model's state dict to
``<work>/official_state_dict.pth`` (the format of a released checkpoint) for ``flmm-convert``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from functools import partial
from pathlib import Path

import torch
from torch import nn


def load_module(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def install_stubs(deps: Path) -> None:
    """xtuner's package __init__ imports its whole CLI: only the pieces the model files use are loaded."""
    for name in ("xtuner", "xtuner.utils", "xtuner.model"):
        sys.modules[name] = types.ModuleType(name)
    registry = types.ModuleType("xtuner.registry")
    registry.BUILDER = types.SimpleNamespace(build=lambda cfg: cfg)  # the probe passes built objects
    sys.modules["xtuner.registry"] = registry
    model_utils = types.ModuleType("xtuner.model.utils")
    model_utils.guess_load_checkpoint = None  # only called with pretrained=..., never here
    model_utils.LoadWoInit = None  # only used by the constructors, which the probe does not call
    sys.modules["xtuner.model.utils"] = model_utils
    load_module("xtuner.utils.templates", deps / "xtuner" / "utils" / "templates.py")


def load_unet_head(official: Path, deps: Path):
    """The official UNetHead on MMSeg's UNet, loaded module by module (``mmseg.models`` imports mmcv ops)."""
    for name in ("mmseg", "mmseg.models", "mmseg.models.backbones", "mmseg.models.utils"):
        module = types.ModuleType(name)
        module.__path__ = []
        sys.modules[name] = module
    mmseg = deps / "mmseg"
    load_module("mmseg.registry", mmseg / "registry" / "registry.py")
    wrappers = load_module("mmseg.models.utils.wrappers", mmseg / "models" / "utils" / "wrappers.py")
    up_conv = load_module("mmseg.models.utils.up_conv_block", mmseg / "models" / "utils" / "up_conv_block.py")
    sys.modules["mmseg.models.utils"].Upsample = wrappers.Upsample
    sys.modules["mmseg.models.utils"].resize = wrappers.resize
    sys.modules["mmseg.models.utils"].UpConvBlock = up_conv.UpConvBlock
    sys.modules["mmseg.models.utils"].wrappers = wrappers
    unet = load_module("mmseg.models.backbones.unet", mmseg / "models" / "backbones" / "unet.py")
    sys.modules["mmseg.models"].UNet = unet.UNet
    head = load_module(
        "flmm.models.mask_head.mask_decoder", official / "flmm/models/mask_head/mask_decoder.py"
    )
    return head.UNetHead, unet.InterpConv


def llava_439(lmm_dir: Path):
    """Our tiny LLaVA (saved by transformers 5.x) as transformers 4.39's classes, weights loaded strictly."""
    from llava.modeling_llava import CustomLlavaForConditionalGeneration
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    raw = json.loads((lmm_dir / "config.json").read_text())
    text = dict(raw["text_config"])
    text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**raw["vision_config"]),
        text_config=LlamaConfig(**text),
        image_token_index=raw["image_token_index"],
        pad_token_id=raw["pad_token_id"],
        vision_feature_layer=raw["vision_feature_layer"],
        vision_feature_select_strategy=raw["vision_feature_select_strategy"],
        projector_hidden_act=raw["projector_hidden_act"],
    )
    config._attn_implementation = "eager"
    model = CustomLlavaForConditionalGeneration(config)
    state = {}
    for key, value in load_file(lmm_dir / "model.safetensors").items():
        if key.startswith("vision_tower."):
            key = "vision_tower.vision_model." + key.removeprefix("vision_tower.")
        state[key] = value
    model.load_state_dict(state, strict=True)
    return model.eval()


def tokenizer_439(lmm_dir: Path, work: Path):
    """tokenizers 0.15 cannot parse a tokenizer.json of today's tokenizers: merges as "a b", no ignore_merges,
    no Metaspace split field (0.15 names add_prefix_space). Ids are compared on both sides anyway."""
    from transformers import LlamaTokenizerFast

    data = json.loads((lmm_dir / "tokenizer.json").read_text())
    model = data["model"]
    model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    model.pop("ignore_merges", None)
    for part in ("pre_tokenizer", "decoder", "normalizer"):
        node = data.get(part) or {}
        for item in [
            node,
            *node.get("pretokenizers", []),
            *node.get("decoders", []),
            *node.get("normalizers", []),
        ]:
            if item.get("type") == "Metaspace":
                item.pop("split", None)
                item["add_prefix_space"] = item.get("prepend_scheme") != "never"
    folder = work / "tokenizer_439"
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((lmm_dir / "tokenizer_config.json").read_text())
    keep = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in config}
    (folder / "tokenizer_config.json").write_text(json.dumps({**keep, "legacy": False}))
    return LlamaTokenizerFast.from_pretrained(str(folder))


def load_sam_wrapper(official: Path, mask_input_size: int):
    """The official SAMWrapper with its hard-coded 256x256 mask-prompt size (ViT-B/L/H's) set to the tiny
    SAM's (``prompt_encoder.mask_input_size``); nothing else of its source is changed."""
    path = official / "flmm/models/mask_head/mask_refiner.py"
    source = path.read_text()
    assert source.count("256, 256") == 2, "the official SAMWrapper changed: check the mask-prompt size"
    source = source.replace("256, 256", f"{mask_input_size}, {mask_input_size}")
    module = types.ModuleType("flmm.models.mask_head.mask_refiner")
    module.__file__ = str(path)
    exec(compile(source, str(path), "exec"), module.__dict__)
    sys.modules[module.__name__] = module
    return module.SAMWrapper


def tiny_sam_official():
    """The tiny SAM of our assets built from the official repository's vendored segment_anything."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=256,
            patch_size=16,
            embed_dim=64,
            depth=2,
            num_heads=2,
            mlp_ratio=4.0,
            out_chans=64,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=8,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=64, image_embedding_size=(16, 16), input_image_size=(256, 256), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=64, mlp_dim=128, num_heads=2),
            transformer_dim=64,
            iou_head_depth=3,
            iou_head_hidden_dim=64,
        ),
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--official", type=Path, required=True, help="the official repository's files")
    parser.add_argument(
        "--deps", type=Path, required=True, help="the --target dir of mmengine/mmcv/mmseg/xtuner"
    )
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--sam-checkpoint", type=Path, required=True, help="our tiny SAM's .pth")
    args = parser.parse_args()
    sys.path[:0] = [str(args.official), str(args.deps)]
    install_stubs(args.deps)
    from flmm.datasets.llava_processors import CustomLlavaImageProcessor
    from flmm.models.frozen_llava import FrozenLlavaSAM

    SAMWrapper = load_sam_wrapper(args.official, mask_input_size=64)
    from segment_anything.utils.transforms import ResizeLongestSide
    from xtuner.utils.templates import PROMPT_TEMPLATE

    UNetHead, InterpConv = load_unet_head(args.official, args.deps)
    ours = torch.load(args.work / "ours.pt", weights_only=True)
    lmm_dir = Path(ours["lmm_dir"])
    llava = llava_439(lmm_dir)
    tokenizer = tokenizer_439(lmm_dir, args.work)
    processor_cfg = json.loads((lmm_dir / "processor_config.json").read_text())["image_processor"]
    image_processor = CustomLlavaImageProcessor(
        **{k: v for k, v in processor_cfg.items() if k != "image_processor_type"}
    )

    # FrozenLlavaSAM.__init__ builds from configs: the same attributes, set from built parts.
    model = FrozenLlavaSAM.__new__(FrozenLlavaSAM)
    nn.Module.__init__(model)
    model.llava = llava
    layers = llava.config.text_config.num_hidden_layers
    heads = llava.config.text_config.num_attention_heads
    from torch.nn import GroupNorm

    model.mask_head = UNetHead(
        normalize_input=True,
        upsample_input=64,
        in_channels=layers * heads,
        base_channels=64,
        num_stages=4,
        strides=(1, 1, 1, 1),
        enc_num_convs=(2, 2, 2, 2),
        dec_num_convs=(2, 2, 2),
        downsamples=(True, True, True),
        enc_dilations=(1, 1, 1, 1),
        dec_dilations=(1, 1, 1),
        norm_cfg=dict(type=GroupNorm, num_groups=1),
        upsample_cfg=dict(type=InterpConv),
    )
    model.patch_size = llava.config.vision_config.patch_size
    model.merge = "mean"
    model.text_layer_weights = nn.Parameter(torch.ones(layers))
    sam = SAMWrapper.__new__(SAMWrapper)
    nn.Module.__init__(sam)
    sam.model = tiny_sam_official()
    sam.model.load_state_dict(torch.load(args.sam_checkpoint, weights_only=True), strict=True)
    sam.transform = ResizeLongestSide(sam.model.image_encoder.img_size)
    sam.use_text, sam.use_mask, sam.use_box, sam.multimask_output = True, True, True, False
    model.sam = sam
    model.text_proj = nn.Linear(llava.config.text_config.hidden_size, sam.model.prompt_encoder.embed_dim)
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
        return torch.from_numpy(processed["pixel_values"][0]), processed["meta_datas"][0]

    run_official(model, ours, tokenizer, prompt_ids, preprocess, args.work)


def official_boxes(coarse: torch.Tensor, image) -> torch.Tensor:
    """The box prompts SAMWrapper.forward gives SAM (before ``apply_boxes``), by its own ``mask2box``."""
    import numpy as np
    import torch.nn.functional as F
    from flmm.models.mask_head.mask_refiner import mask2box

    binary = F.interpolate(
        coarse.detach()[None].float().sigmoid(), size=(image.height, image.width), mode="bilinear"
    )
    boxes = []
    for mask in (binary[0] > 0.5).float():
        boxes.append(
            mask2box(mask.numpy()) if mask.sum() > 0 else np.array([0, 0, image.width, image.height])
        )
    return torch.tensor(np.stack(boxes))


def official_names(trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our trainable weights under the official names: what a released checkpoint holds."""
    names = {
        "lmm.text_layer_weights": "text_layer_weights",
        "lmm.text_proj.": "text_proj.",
        "mask_head.": "mask_head.",
        "sam.sam.": "sam.model.",
    }
    official_state = {}
    for key, value in trainable.items():
        prefix = next(p for p in names if key.startswith(p))
        official_state[names[prefix] + key[len(prefix) :]] = value
    return official_state


def run_official(model, ours, tokenizer, prompt_ids, preprocess, work: Path) -> None:
    """The official model's ``_forward`` on each case: its RefCOCO2PNG token layout (prompt, then each
    phrase's own tokens and ``encode(".")[-1]``), its image processor (``preprocess``); the U-Net input and
    SAM's inputs recorded; then a crossed run with our pixels. Writes ``<work>/official.pt``."""
    from PIL import Image

    dot = tokenizer.encode(".", add_special_tokens=False)[-1]
    results = []
    for case in ours["cases"]:
        image = Image.open(case["photo_path"]).convert("RGB")
        ids, mask_ids = list(prompt_ids), [-1] * len(prompt_ids)
        for index, phrase in enumerate(case["phrases"]):
            phrase_ids = tokenizer.encode(phrase, add_special_tokens=False)
            ids += phrase_ids + [dot]
            mask_ids += [index] * len(phrase_ids) + [-1]
        pixel_values, meta_data, *extra = preprocess(image)
        sample = {
            "input_ids": torch.tensor(ids),
            "mask_ids": torch.tensor(mask_ids),
            "labels": torch.full((len(ids),), -100),
            "pixel_values": pixel_values,
            "meta_data": meta_data,
            "masks": torch.zeros(len(case["phrases"]), 2, 2),
            "image": image,
            **(extra[0] if extra else {}),
        }
        captured = {}
        original_sam = model.sam.forward

        def recording_sam(image, pred_masks, text_embeds):
            captured["coarse"], captured["text_embeds"] = pred_masks, text_embeds  # noqa: B023
            return original_sam(image, pred_masks, text_embeds)  # noqa: B023

        model.sam.forward = recording_sam
        original_head = model.mask_head.forward

        def recording_head(x):
            captured["maps"] = x  # noqa: B023
            return original_head(x)  # noqa: B023

        model.mask_head.forward = recording_head
        with torch.no_grad():
            out = model._forward(sample)
        model.sam.forward, model.mask_head.forward = original_sam, original_head
        official_maps = captured["maps"]
        # crossed: the official token ids with our pixels (a preprocessing difference seen apart)
        crossed_sample = {**sample, "pixel_values": case["pixel_values"]}
        model.mask_head.forward = recording_head
        with torch.no_grad():
            model._forward(crossed_sample)
        model.mask_head.forward = original_head
        results.append(
            {
                "input_ids": sample["input_ids"],
                "mask_ids": sample["mask_ids"],
                "expanded_mask_ids": out["mask_ids"].flatten(),
                "pixel_values": sample["pixel_values"],
                "attention_maps": official_maps,
                "text_embeddings": captured["text_embeds"],
                "coarse_logits": out["pred_masks"],
                "fine_logits": out["sam_pred_masks"],
                "meta_data": sample["meta_data"],
                "crossed_attention_maps": captured["maps"],
                "boxes": official_boxes(out["pred_masks"], image),
            }
        )
    torch.save({"cases": results}, work / "official.pt")
    print(f"wrote {work / 'official.pt'}")


if __name__ == "__main__":
    main()
