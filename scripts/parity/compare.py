"""Stage-by-stage differences between ``<work>/ours.pt`` and ``<work>/official.pt`` (this project's venv)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.shape == b.shape else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    ours = torch.load(args.work / "ours.pt", weights_only=True)["cases"]
    theirs = torch.load(args.work / "official.pt", weights_only=False)["cases"]  # our own probe's output
    rows = []
    for o, t in zip(ours, theirs, strict=True):
        # ours expands the image placeholder in the ids; the official model expands it inside the forward
        image_token = int(o["input_ids"][(o["mask_ids"] == -1)].mode().values)
        collapsed = [
            i
            for k, i in enumerate(o["input_ids"].tolist())
            if i != image_token or k == 0 or o["input_ids"][k - 1] != image_token
        ]
        their_ids = t["input_ids"].tolist()
        ours_text = [i for i in o["input_ids"].tolist() if i != image_token]
        theirs_text = [i for i in their_ids if i != image_token]
        row = {
            "photo": o["photo"],
            "token_ids_equal": (
                o["input_ids"].tolist() if len(o["input_ids"]) == len(their_ids) else collapsed
            )
            == their_ids,
            "text_ids_ours": ours_text,
            "text_ids_official": theirs_text,
            "mask_ids_equal (expanded)": torch.equal(o["mask_ids"], t["expanded_mask_ids"].cpu())
            if o["mask_ids"].shape == t["expanded_mask_ids"].shape
            else False,
            "pixel_values": max_abs(o["pixel_values"], t["pixel_values"]),
            **(
                {"high_res_pixel_values": max_abs(o["high_res_pixel_values"], t["high_res_pixel_values"])}
                if "high_res_pixel_values" in o
                else {}
            ),
            "attention_maps": max_abs(o["attention_maps"], t["attention_maps"]),
            "attention_maps_max": float(o["attention_maps"].abs().max()),
            "attention_maps (crossed: our pixels)": max_abs(o["attention_maps"], t["crossed_attention_maps"]),
            "text_embeddings": max(
                max_abs(a, b) for a, b in zip(o["text_embeddings"], t["text_embeddings"], strict=True)
            ),
            "coarse_logits": max_abs(o["coarse_logits"], t["coarse_logits"]),
            "coarse_logits_max": float(o["coarse_logits"].abs().max()),
            "sam_box_prompts_equal": bool(torch.equal(o["boxes"].long(), t["boxes"].long())),
            "fine_logits": max_abs(o["fine_logits"], t["fine_logits"]),
            "fine_logits_max": float(o["fine_logits"].abs().max()),
            "fine_masks_differing_pixels": int(((o["fine_logits"] > 0) != (t["fine_logits"] > 0)).sum())
            if o["fine_logits"].shape == t["fine_logits"].shape
            else -1,
        }
        rows.append(row)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
