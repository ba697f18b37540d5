"""Our side of the parity probe: the tiny model of one family on the fixture photos and phrases, every stage
saved to ``<out>/ours.pt`` (run with this project's venv). See README.md beside this file."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from flmm_lightning.boundaries import GroundingSample
from flmm_lightning.convert import compose_model_config
from flmm_lightning.heads.sam_refiner import binarize_coarse, mask_boxes_exclusive
from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.runs.build import build_module, build_prompt_builder

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "coco_sample" / "images"
# (photo, phrases): real COCO images of the fixtures, a landscape and a portrait-free wide one
CASES = (
    ("000000142238.jpg", ["a man on the left", "the dog"]),
    ("000000439180.jpg", ["the red car", "a tree"]),
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny_llava")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--perturb-constants",
        action="store_true",
        help="run on a copy of the tiny LMM (<out>/lmm) whose constant vision tensors are made random",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.pretrained=<dir>")
    args = parser.parse_args()
    torch.manual_seed(0)
    overrides = list(args.overrides)
    if args.perturb_constants:
        source = compose_model_config(args.model, "tiny", None, overrides).model.pretrained
        overrides.append(f"model.pretrained={perturbed_copy(Path(source), args.out / 'lmm')}")
    cfg = compose_model_config(args.model, "tiny", None, overrides)
    module = build_module(cfg)
    with torch.no_grad():
        module.model.lmm.text_layer_weights.normal_()
    grounder = Grounder(module.model, build_prompt_builder(cfg), cfg.sam.image_size, device="cpu")
    results = []
    for photo, phrases in CASES:
        image = Image.open(FIXTURES / photo).convert("RGB")
        sample = GroundingSample.for_inference(image, phrases, file_name=photo)
        encoded = grounder.encode.encode(sample)
        batch = grounder.collate([encoded])
        with torch.no_grad():
            prediction = grounder.model(batch)[0]
        coarse = prediction.coarse_logits
        results.append(
            {
                "photo": photo,
                "photo_path": str(FIXTURES / photo),
                "phrases": phrases,
                "input_ids": batch.lmm.input_ids[0],
                "mask_ids": batch.lmm.mask_ids[0],
                "pixel_values": batch.lmm.pixel_inputs["pixel_values"][0],
                **{
                    name: pixels[0]
                    for name, pixels in batch.lmm.pixel_inputs.items()
                    if name == "high_res_pixel_values"
                },
                "grid_hw": batch.lmm.grid_hw[0],
                "attention_maps": prediction.features.attention_maps,
                "text_embeddings": prediction.features.text_embeddings,
                "coarse_logits": coarse,
                "boxes": mask_boxes_exclusive(binarize_coarse(coarse, (image.height, image.width))),
                "fine_logits": prediction.fine_logits,
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    state = module.model.trainable_state_dict()
    torch.save(
        {"cases": results, "trainable": state, "lmm_dir": str(cfg.model.pretrained)}, args.out / "ours.pt"
    )
    print(f"wrote {args.out / 'ours.pt'}")


def perturbed_copy(source: Path, target: Path) -> Path:
    """``source`` (a tiny LMM directory) copied to ``target`` with every constant tensor outside the language
    model (zero biases, zero positional and relative-position tables, unit norm weights, the hybrid's zero
    high-res weight) drawn at random, so that the probe exercises each of them."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    state = load_file(source / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    for key, value in state.items():
        if (
            "language_model" not in key
            and key != "lm_head.weight"
            and bool((value == value.flatten()[0]).all())
        ):
            state[key] = value + 0.2 * torch.randn(value.shape, generator=generator, dtype=value.dtype)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


if __name__ == "__main__":
    main()
