"""U-Net mask head: per-object LMM attention maps -> coarse mask logits.

Behaviourally the reference's ``UNetHead`` (MMSegmentation ``UNet`` with ``InterpConv`` upsampling,
GroupNorm(1 group), ReLU, strides 1, max-pool downsampling) written in plain torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ConvNormAct(nn.Module):
    """Conv (no bias: GroupNorm follows) + GroupNorm(1 group) + ReLU, MMCV's ``ConvModule`` order."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.gn = nn.GroupNorm(1, out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.gn(self.conv(x)))


class ConvBlock(nn.Module):
    """``num_convs`` 3x3 ConvNormAct layers (MMSeg ``BasicConvBlock``)."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *(ConvNormAct(in_channels if i == 0 else out_channels, out_channels, 3) for i in range(num_convs))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class Upsample2x(nn.Module):
    """x2 bilinear upsampling (align_corners=False)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [n, C, h, w]
        h, w = x.shape[-2:]
        # The reference patches MMSeg's Upsample to interpolate in float32 (bf16 bilinear is lossy).
        return F.interpolate(x.float(), size=(2 * h, 2 * w), mode="bilinear", align_corners=False).to(x.dtype)


class InterpConv(nn.Module):
    """x2 bilinear upsampling, then a 1x1 ConvNormAct (MMSeg ``InterpConv`` with ``conv_first=False``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.interp_upsample = nn.Sequential(Upsample2x(), ConvNormAct(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.interp_upsample(x)  # [n, C_out, 2h, 2w]


class UpConvBlock(nn.Module):
    """Upsample the deeper feature to the skip's size and channels, concat ``[skip, up]``, conv block."""

    def __init__(self, in_channels: int, skip_channels: int, num_convs: int) -> None:
        super().__init__()
        self.upsample = InterpConv(in_channels, skip_channels)
        self.conv_block = ConvBlock(2 * skip_channels, skip_channels, num_convs)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # skip: [n, C, 2h, 2w], x: [n, 2C, h, w]
        x = self.upsample(x)  # [n, C, 2h, 2w]
        return self.conv_block(torch.cat([skip, x], dim=1))  # [n, C, 2h, 2w]


class UNetMaskHead(nn.Module):
    """Attention maps ``[n, C, h, w]`` (non-negative) -> mask logits ``[n, h', w']``.

    ``h', w'`` is the grid after the input upsampling: ``floor(h * s), floor(w * s)`` with
    ``s = max(1, upsample_to / max(h, w))``.

    Weight init follows MMSeg's UNet default: every conv kaiming-normal (fan_out, ReLU gain), biases 0;
    GroupNorm weight 1, bias 0. Parameter names are those of the reference's ``UNetHead`` (MMSeg ``UNet``),
    so a released F-LMM checkpoint's ``mask_head.*`` entries load with the prefix stripped.
    """

    def __init__(
        self,
        in_channels: int,
        base_channels: int = 64,
        num_stages: int = 4,
        convs_per_stage: int = 2,
        upsample_to: int = 64,
        normalize_input: bool = True,
    ) -> None:
        super().__init__()
        self.num_stages = num_stages
        self.upsample_to = upsample_to
        self.normalize_input = normalize_input

        channels = [base_channels * 2**i for i in range(num_stages)]
        self.encoder = nn.ModuleList()
        for i, out_channels in enumerate(channels):
            block = ConvBlock(in_channels if i == 0 else channels[i - 1], out_channels, convs_per_stage)
            pool = [nn.MaxPool2d(kernel_size=2)] if i > 0 else []
            self.encoder.append(nn.Sequential(*pool, block))
        # decoder[i] merges encoder stage i+1 into the skip of stage i; runs deepest first.
        self.decoder = nn.ModuleList(
            UpConvBlock(channels[i + 1], channels[i], convs_per_stage) for i in range(num_stages - 1)
        )
        self.conv_seg = nn.Conv2d(base_channels, 1, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [n, C, h, w]
        h, w = x.shape[-2:]
        if self.normalize_input:
            # Each map becomes a distribution over the grid, so the head sees where, not how much.
            x = x / x.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-12)

        # Passing the scale factor (not a size) matters: it sets both the floor output size and the
        # source-coordinate mapping, as in the reference.
        scale_factor = max(1.0, self.upsample_to / max(h, w))
        x = F.interpolate(x.float(), scale_factor=scale_factor, mode="bilinear").to(x.dtype)
        h, w = x.shape[-2:]  # [n, C, h', w']

        divisor = 2 ** (self.num_stages - 1)
        x = F.pad(x, (0, math.ceil(w / divisor) * divisor - w, 0, math.ceil(h / divisor) * divisor - h))

        skips = []
        for stage in self.encoder:
            x = stage(x)  # [n, base * 2**i, H_pad / 2**i, W_pad / 2**i]
            skips.append(x)
        for i in reversed(range(self.num_stages - 1)):
            x = self.decoder[i](skips[i], x)  # [n, base * 2**i, H_pad / 2**i, W_pad / 2**i]

        x = x[..., :h, :w]  # [n, base, h', w']
        return self.conv_seg(x)[:, 0]  # [n, h', w']


def crop_to_content(
    logits: torch.Tensor, padded_hw: tuple[int, int], content_box: tuple[int, int, int, int]
) -> torch.Tensor:
    """Remove the processor's padding from coarse logits ``[n, mh, mw]``.

    ``padded_hw`` is the processed image size (pixels) the logits cover and ``content_box`` the
    ``(top, left, height, width)`` of the real image inside it. Rounding as in the reference: the offset is
    truncated, the size rounded half up.
    """
    mh, mw = logits.shape[-2:]
    ph, pw = padded_hw
    top, left, height, width = content_box
    y0 = int(top * mh / ph)
    x0 = int(left * mw / pw)
    size_h = int(height * mh / ph + 0.5)
    size_w = int(width * mw / pw + 0.5)
    return logits[..., y0 : y0 + size_h, x0 : x0 + size_w]
