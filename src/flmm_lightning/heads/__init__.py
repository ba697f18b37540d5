"""Trainable heads on top of the frozen LMM: U-Net mask head, SAM refiner, losses (the keyword selector reads
the LMM's hidden states inside its adapter: ``lmm.keyword_selector``)."""

from flmm_lightning.heads.losses import MaskLosses, bce_loss, dice_loss, keyword_selector_loss, mask_losses
from flmm_lightning.heads.sam_refiner import (
    SamRefiner,
    binarize_coarse,
    build_sam,
    mask_boxes_exclusive,
    prompt_masks,
    resize_boxes,
    select_candidate,
)
from flmm_lightning.heads.unet import UNetMaskHead, crop_to_content

__all__ = [
    "MaskLosses",
    "SamRefiner",
    "UNetMaskHead",
    "bce_loss",
    "binarize_coarse",
    "build_sam",
    "crop_to_content",
    "dice_loss",
    "keyword_selector_loss",
    "mask_losses",
    "mask_boxes_exclusive",
    "prompt_masks",
    "resize_boxes",
    "select_candidate",
]
