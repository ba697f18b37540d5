"""Mask losses and training-time mask statistics (reference: ``FrozenLlava._compute``); the keyword
selector's token loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flmm_lightning.common.masks import mask_iou


@dataclass
class MaskLosses:
    bce: torch.Tensor  # scalar, differentiable
    dice: torch.Tensor  # scalar, differentiable
    accuracy: torch.Tensor  # scalar, detached: pixel accuracy of sigmoid > 0.5
    iou: torch.Tensor  # scalar, detached: mean per-mask IoU of sigmoid > 0.5


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``1 - (2·Σpg + 1) / (Σp + Σg + 1)`` per mask (p = sigmoid(logit)), averaged over masks.

    logits, targets: ``[n, ...]``; targets in {0, 1} (any dtype).
    """
    p = logits.flatten(1).float().sigmoid()  # [n, P]
    g = targets.flatten(1).to(p.dtype)  # [n, P]
    dice = (2 * (p * g).sum(-1) + 1) / (p.sum(-1) + g.sum(-1) + 1)  # [n]
    return (1 - dice).mean()


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits averaged over every pixel of every mask."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


def mask_losses(logits: torch.Tensor, gt: torch.Tensor) -> MaskLosses:
    """Losses and statistics of predicted logits ``[n, h, w]`` against boolean ground truth ``[n, H, W]``.

    The ground truth is resized with nearest neighbour to the prediction size.
    """
    gt = F.interpolate(gt[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0]  # [n, h, w]
    with torch.no_grad():
        pred = logits.float().sigmoid() > 0.5  # [n, h, w]
        accuracy = (pred == gt.bool()).float().mean()
        iou = mask_iou(pred, gt.bool(), empty=0.0).mean().float()
    return MaskLosses(bce=bce_loss(logits, gt), dice=dice_loss(logits, gt), accuracy=accuracy, iou=iou)


def keyword_selector_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the keyword selector's token logits, averaged over the valid tokens.

    logits: ``[..., T]``; labels: bool ``[..., T]`` (token of a grounded phrase); valid: bool ``[..., T]``
    (a token of the text: not prompt, image or padding). With no valid token the loss is 0, still attached
    to the logits so that every DDP rank's gradient covers the selector.
    """
    logits = logits.float()
    per_token = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    valid = valid.to(logits.dtype)
    return (per_token * valid).sum() / valid.sum().clamp(min=1)
