"""The official model's own state dict (``<work>/official_state_dict.pth``, from the official side),
converted by ``flmm_lightning.convert`` and loaded by ``Grounder.from_checkpoint``, grounds the probe's
cases: its masks beside the official model's (``<work>/official.pt``). Run with this project's venv."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flmm_lightning.convert import compose_model_config, convert
from flmm_lightning.inference.grounder import Grounder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny_llava")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.pretrained=<dir>")
    args = parser.parse_args()
    output = args.work / "converted.ckpt"
    output.unlink(missing_ok=True)
    counts = convert(
        args.work / "official_state_dict.pth",
        output,
        compose_model_config(args.model, "tiny", None, args.overrides),
    )
    grounder = Grounder.from_checkpoint(output, device="cpu")
    ours = torch.load(args.work / "ours.pt", weights_only=True)["cases"]
    official = torch.load(args.work / "official.pt", weights_only=False)["cases"]  # this probe's own output
    rows = []
    for case, theirs in zip(ours, official, strict=True):
        grounding = grounder.ground(case["photo_path"], case["phrases"])
        fine = theirs["fine_logits"]
        rows.append(
            {
                "photo": case["photo"],
                "converted_tensors": counts,
                "official_masks_equal": bool(torch.equal(grounding.masks, fine > 0)),
                "differing_mask_pixels": int((grounding.masks != (fine > 0)).sum()),
                "mask_pixels": int(grounding.masks.sum()),
            }
        )
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
