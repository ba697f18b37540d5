"""The tiny SAM: segment-anything's architecture at toy size, and its checkpoint (random weights)."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from flmm_lightning.assets.store import DEFAULT_SEED, cache_root, ensure_built
from flmm_lightning.heads.sam_refiner import load_sam_weights

TINY_SAM = "tiny_sam"
TINY_SAM_VERSION = 1
TINY_SAM_FILE = "sam_tiny.pth"


def build_tiny_sam(checkpoint: str | None = None) -> Sam:
    """A SAM with the real architecture at toy size (256 px input, 16x16 embedding, 64 channels), with the
    weights of ``checkpoint`` (``conf/sam/tiny.yaml``'s ``_target_``; the official ones: ``build_sam``)."""
    img_size, patch_size, embed_dim = 256, 16, 64
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=64,
            depth=2,
            num_heads=2,
            mlp_ratio=4.0,
            out_chans=embed_dim,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=8,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=embed_dim,
            image_embedding_size=(img_size // patch_size, img_size // patch_size),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=embed_dim, mlp_dim=128, num_heads=2),
            transformer_dim=embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=embed_dim,
        ),
    )
    return load_sam_weights(sam, checkpoint, "tiny")


def tiny_sam_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``ensure_tiny_sam`` writes the checkpoint file (nothing is built)."""
    return cache_root(cache_dir) / TINY_SAM / TINY_SAM_FILE


def ensure_tiny_sam(cache_dir: str | os.PathLike | None = None, seed: int = DEFAULT_SEED) -> Path:
    """Path of the tiny SAM checkpoint file (a state dict, as the official ones), built on first use.

    ``build_tiny_sam(path)`` loads it back through ``load_sam_weights``, as ``build_sam("vit_l", path)``
    loads an official one.
    """

    def build(out_dir: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sam = build_tiny_sam()
        torch.save(sam.state_dict(), out_dir / TINY_SAM_FILE)

    spec = {"name": TINY_SAM, "version": TINY_SAM_VERSION, "seed": seed}
    target = tiny_sam_path(cache_dir)
    ensure_built(target.parent, spec, build)
    return target
