import math

import torch

from flmm_lightning.heads import bce_loss, dice_loss, mask_losses

LN3 = math.log(3.0)


def test_dice_by_hand() -> None:
    # p = [0.5, 0.75, 0.25, 0.5], g = [1, 1, 0, 0]: Σpg = 1.25, Σp = 2, Σg = 2 -> dice 3.5 / 5.
    # Second mask: p = 0.5 everywhere, g = 0: Σpg = 0, Σp = 2, Σg = 0 -> dice 1 / 3.
    logits = torch.tensor([[[0.0, LN3], [-LN3, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    targets = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.bool)
    expected = ((1 - 3.5 / 5) + (1 - 1 / 3)) / 2
    torch.testing.assert_close(dice_loss(logits, targets), torch.tensor(expected))


def test_bce_by_hand() -> None:
    logits = torch.tensor([[[0.0, LN3], [-LN3, 0.0]]])
    targets = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # -log(0.5), -log(0.75), -log(0.75), -log(0.5), averaged.
    expected = (2 * math.log(2.0) + 2 * math.log(4 / 3)) / 4
    torch.testing.assert_close(bce_loss(logits, targets), torch.tensor(expected))


def test_mask_losses_resizes_gt_with_nearest_neighbour() -> None:
    logits = torch.tensor([[[0.0, LN3], [-LN3, 0.0]]], requires_grad=True)
    # Nearest neighbour 4x4 -> 2x2 keeps pixels (0, 0), (0, 2), (2, 0), (2, 2): [[1, 1], [0, 0]].
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, 0, 0] = gt[0, 0, 2] = True
    gt[0, 1, 1] = gt[0, 3, 3] = True  # dropped by the resize
    losses = mask_losses(logits, gt)
    torch.testing.assert_close(losses.dice, torch.tensor(1 - 3.5 / 5))
    torch.testing.assert_close(losses.bce, torch.tensor((2 * math.log(2.0) + 2 * math.log(4 / 3)) / 4))
    # Prediction sigmoid > 0.5 = [[0, 1], [0, 0]] against [[1, 1], [0, 0]].
    torch.testing.assert_close(losses.accuracy, torch.tensor(0.75))
    torch.testing.assert_close(losses.iou, torch.tensor(0.5))
    assert not losses.accuracy.requires_grad and not losses.iou.requires_grad
    (losses.bce + losses.dice).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_iou_is_mean_over_masks() -> None:
    logits = torch.tensor([[[5.0, 5.0], [-5.0, -5.0]], [[5.0, -5.0], [-5.0, -5.0]]])
    gt = torch.tensor([[[1, 1], [0, 0]], [[0, 1], [0, 0]]], dtype=torch.bool)
    losses = mask_losses(logits, gt)
    torch.testing.assert_close(losses.iou, torch.tensor((1.0 + 0.0) / 2))
    torch.testing.assert_close(losses.accuracy, torch.tensor(6 / 8))
