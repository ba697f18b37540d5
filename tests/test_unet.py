import math

import pytest
import torch

from flmm_lightning.heads import UNetMaskHead, crop_to_content


def small_head(in_channels: int = 6, **kwargs) -> UNetMaskHead:
    return UNetMaskHead(in_channels, base_channels=8, **kwargs)


@pytest.mark.parametrize("grid", [(17, 23), (9, 9), (64, 48), (1, 1), (70, 33)])
def test_output_size_follows_input_upsampling(grid: tuple[int, int]) -> None:
    torch.manual_seed(0)
    h, w = grid
    head = small_head()
    out = head(torch.rand(2, 6, h, w))
    scale = max(1.0, 64 / max(h, w))
    assert out.shape == (2, math.floor(h * scale), math.floor(w * scale))
    assert torch.isfinite(out).all()


def test_default_config_channels() -> None:
    head = UNetMaskHead(in_channels=40)
    shapes = {name: tuple(p.shape) for name, p in head.state_dict().items()}
    # MMSeg UNet parameter names (ConvModule: conv / gn; InterpConv: interp_upsample.1).
    assert shapes["encoder.0.0.convs.0.conv.weight"] == (64, 40, 3, 3)
    assert shapes["encoder.0.0.convs.0.gn.weight"] == (64,)
    assert "encoder.0.0.convs.0.conv.bias" not in shapes
    assert shapes["encoder.3.1.convs.1.conv.weight"] == (512, 512, 3, 3)
    assert shapes["decoder.2.upsample.interp_upsample.1.conv.weight"] == (256, 512, 1, 1)
    assert shapes["decoder.0.conv_block.convs.0.conv.weight"] == (64, 128, 3, 3)
    assert shapes["conv_seg.weight"] == (1, 64, 1, 1)
    assert len(head.encoder) == 4 and len(head.decoder) == 3
    assert head(torch.rand(1, 40, 24, 24)).shape == (1, 64, 64)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    head = small_head()
    x = torch.rand(3, 6, 12, 10, requires_grad=True)
    head(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, param in head.named_parameters():
        assert param.grad is not None, name
    assert head.conv_seg.weight.grad.abs().sum() > 0


def test_runs_under_bf16_autocast() -> None:
    head = small_head()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(torch.rand(2, 6, 24, 24))
    assert out.shape == (2, 64, 64) and torch.isfinite(out.float()).all()


def test_normalize_input_is_scale_invariant() -> None:
    torch.manual_seed(0)
    head = small_head().eval()
    x = torch.rand(2, 6, 11, 13)
    scaled = x.clone()
    scaled[0, 3] *= 3.7
    scaled[1, 0] *= 0.01
    torch.testing.assert_close(head(scaled), head(x), atol=1e-5, rtol=1e-5)


def test_without_normalization_scale_matters() -> None:
    torch.manual_seed(0)
    head = small_head(normalize_input=False).eval()
    x = torch.rand(1, 6, 11, 13)
    scaled = x.clone()
    scaled[0, 3] *= 3.7
    assert not torch.allclose(head(scaled), head(x), atol=1e-4)


@pytest.mark.parametrize(
    ("padded_hw", "content_box", "expected_rows", "expected_cols"),
    [
        # LLaVA pad-to-square of a 480x640 image: 80 rows of padding on top and bottom.
        ((640, 640), (80, 0, 480, 640), (8, 56), (0, 64)),
        # 336x336 square with 37 columns of padding on the left: int(37*64/336)=7, int(262*64/336+0.5)=50.
        ((336, 336), (0, 37, 336, 262), (0, 64), (7, 57)),
        # Nothing padded.
        ((336, 336), (0, 0, 336, 336), (0, 64), (0, 64)),
    ],
)
def test_crop_to_content(padded_hw, content_box, expected_rows, expected_cols) -> None:
    logits = torch.arange(3 * 64 * 64, dtype=torch.float32).view(3, 64, 64)
    cropped = crop_to_content(logits, padded_hw, content_box)
    torch.testing.assert_close(
        cropped, logits[:, expected_rows[0] : expected_rows[1], expected_cols[0] : expected_cols[1]]
    )


def test_head_then_crop_on_llava_grid() -> None:
    # 24x24 LLaVA grid -> 64x64 logits -> the 480x640 image's rows.
    head = small_head()
    logits = head(torch.rand(2, 6, 24, 24))
    assert crop_to_content(logits, (336, 336), (42, 0, 252, 336)).shape == (2, 48, 64)
