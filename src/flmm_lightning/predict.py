"""Ground phrases in an image with a trained checkpoint.

CLI: ``python -m flmm_lightning.predict ckpt=<path> image=<file> phrases='[a man, the ball]'`` writes an
overlay PNG and a JSON (each mask as COCO RLE with its box). In Python:
``Grounder.from_checkpoint(path).ground(image, phrases)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.ops import masks_to_boxes

from flmm_lightning.builders import build_prompt_builder, module_from_checkpoint, output_dir_of
from flmm_lightning.config import CONF_DIR, register_resolvers
from flmm_lightning.data.batch import EncodedDataset, GroundingCollate
from flmm_lightning.data.images import to_rgb
from flmm_lightning.data.sample import GroundingSample
from flmm_lightning.lmm.base import PromptBuilder
from flmm_lightning.model import FLMMModule
from flmm_lightning.visualize import overlay_masks

register_resolvers()


@dataclass
class Grounding:
    phrases: list[str]
    masks: torch.Tensor  # bool [n, H, W]
    boxes: torch.Tensor  # float [n, 4] inclusive [x0, y0, x1, y1]; all -1 for an empty mask
    attention_maps: torch.Tensor  # [n, C, h, w] the merged LMM attention each mask was decoded from

    def to_json(self) -> list[dict[str, object]]:
        records = []
        for phrase, mask, box in zip(self.phrases, self.masks, self.boxes, strict=True):
            rle = mask_utils.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)))
            records.append(
                {
                    "phrase": phrase,
                    "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
                    "bbox_xyxy": [float(v) for v in box],
                    "area": int(mask.sum()),
                }
            )
        return records


class Grounder:
    """A trained F-LMM ready to ground phrases in images."""

    def __init__(
        self, module: FLMMModule, prompt_builder: PromptBuilder, sam_image_size: int, device: str = "auto"
    ):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.encode = EncodedDataset([], prompt_builder, sam_image_size)
        self.collate = GroundingCollate(prompt_builder)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "auto", paths: Mapping[str, Any] | None = None
    ) -> Grounder:
        """``paths``: this machine's ``paths.*`` (data, SAM weights, asset cache); the defaults when None."""
        module, config = module_from_checkpoint(path, paths=paths)
        return cls(module, build_prompt_builder(config), config.sam.image_size, device=device)

    @torch.no_grad()
    def ground(self, image: Image.Image | str | Path, phrases: list[str]) -> Grounding:
        if not isinstance(image, Image.Image):
            image = Image.open(image)
        image = to_rgb(image)
        if not phrases:
            raise ValueError("give at least one phrase to ground")
        n = len(phrases)
        sample = GroundingSample(
            image=image,
            phrases=list(phrases),
            masks=torch.zeros(n, image.height, image.width, dtype=torch.bool),
            is_thing=torch.ones(n, dtype=torch.bool),
            is_plural=torch.zeros(n, dtype=torch.bool),
            image_id="input",
            file_name=getattr(image, "filename", "") or "input",
            object_ids=[str(k) for k in range(n)],
        )
        encoded = self.encode.encode(sample)
        batch = move_data_to_device(self.collate([encoded]), self.device)
        prediction = self.module(batch)[0]
        masks = (prediction.fine_logits > 0).cpu()
        boxes = torch.full((n, 4), -1.0)
        nonempty = masks.flatten(1).any(1)
        if nonempty.any():
            boxes[nonempty] = masks_to_boxes(masks[nonempty])
        return Grounding(list(phrases), masks, boxes, prediction.features.attention_maps.cpu())


def predict(cfg: DictConfig) -> tuple[Path, Path]:
    """Grounds ``cfg.phrases`` in ``cfg.image``; returns the paths of the overlay PNG and the masks JSON."""
    grounder = Grounder.from_checkpoint(cfg.ckpt, device=cfg.device, paths=cfg.paths)
    image_path = Path(cfg.image)
    image = to_rgb(Image.open(image_path))
    grounding = grounder.ground(image, list(cfg.phrases))
    output_dir = output_dir_of(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    overlay_path = output_dir / f"{image_path.stem}_overlay.png"
    overlay_masks(image, grounding.masks, grounding.phrases).save(overlay_path)
    json_path = output_dir / f"{image_path.stem}_masks.json"
    json_path.write_text(json.dumps({"image": str(image_path), "objects": grounding.to_json()}, indent=2))
    print(f"overlay: {overlay_path}\nmasks:   {json_path}")
    return overlay_path, json_path


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    predict(cfg)


if __name__ == "__main__":
    main()
