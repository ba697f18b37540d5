"""The tiny SAM checkpoint: segment-anything's architecture at toy size, random weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from flmm_lightning.assets.store import DEFAULT_SEED, cache_root, ensure_built

TINY_SAM = "tiny_sam"
TINY_SAM_VERSION = 1
TINY_SAM_FILE = "sam_tiny.pth"


def ensure_tiny_sam(cache_dir: str | os.PathLike | None = None, seed: int = DEFAULT_SEED) -> Path:
    """Path of the tiny SAM checkpoint file (a state dict, as the official ones), built on first use.

    It is loaded back by ``build_sam("tiny", path)``, the same code path as ``build_sam("vit_l", path)``.
    """
    from flmm_lightning.heads.sam_refiner import build_sam

    def build(out_dir: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sam = build_sam("tiny", None)
        torch.save(sam.state_dict(), out_dir / TINY_SAM_FILE)

    spec = {"name": TINY_SAM, "version": TINY_SAM_VERSION, "seed": seed}
    return ensure_built(cache_root(cache_dir) / TINY_SAM, spec, build) / TINY_SAM_FILE
