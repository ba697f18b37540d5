"""The fast path's SAM encoder: the fused-attention blocks compute segment-anything's function, the encoder
batches any number of images in chunks, and ``"reference"`` restores segment-anything's own attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.modeling.image_encoder import Attention

from flmm_lightning.assets.sam import build_tiny_sam
from flmm_lightning.data.images import sam_input_image
from flmm_lightning.heads import SamRefiner
from flmm_lightning.heads.sam_attention import SdpaRelPosAttention


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    rng = np.random.default_rng(0)
    sizes = [(150, 200), (256, 256), (90, 256), (200, 120), (64, 64)]
    return [
        sam_input_image(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), 256)
        for h, w in sizes
    ]


@pytest.mark.parametrize(("size", "use_rel_pos"), [((6, 5), True), ((8, 8), True), ((8, 8), False)])
def test_sdpa_block_equals_segment_anything(size: tuple[int, int], use_rel_pos: bool) -> None:
    torch.manual_seed(0)
    reference = Attention(32, num_heads=4, qkv_bias=True, use_rel_pos=use_rel_pos, input_size=size)
    if use_rel_pos:
        with torch.no_grad():  # segment-anything zero-initialises the relative positions
            reference.rel_pos_h.normal_()
            reference.rel_pos_w.normal_()
    fused = Attention(32, num_heads=4, qkv_bias=True, use_rel_pos=use_rel_pos, input_size=size)
    fused.load_state_dict(reference.state_dict())
    fused.__class__ = SdpaRelPosAttention
    x = torch.randn(3, *size, 32)
    torch.testing.assert_close(fused(x), reference(x), atol=1e-5, rtol=1e-5)


def test_encoder_chunks_and_attention_switch(images: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    sam = build_tiny_sam()
    with torch.no_grad():
        for module in sam.image_encoder.modules():
            if isinstance(module, Attention):
                module.rel_pos_h.normal_()
                module.rel_pos_w.normal_()
    refiner = SamRefiner(sam, encoder_attention="reference", encoder_batch_size=len(images))
    attention_classes = {type(m) for m in sam.image_encoder.modules() if isinstance(m, Attention)}
    assert attention_classes == {Attention}
    expected = refiner.encode_images(images)  # one call, segment-anything's attention

    refiner.set_encoder_attention("sdpa")
    refiner.encoder_batch_size = 2  # 2 + 2 + 1 images
    attention_classes = {type(m) for m in sam.image_encoder.modules() if isinstance(m, Attention)}
    assert attention_classes == {SdpaRelPosAttention}
    embeddings = refiner.encode_images(images)

    assert embeddings.shape == expected.shape == (len(images), *refiner.embedding_shape)
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=1e-5)
    assert SamRefiner(build_tiny_sam()).encoder_batch_size == 4  # the default


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="encoder_batch_size"):
        SamRefiner(build_tiny_sam(), encoder_batch_size=0)
    with pytest.raises(ValueError, match="must be one of"):
        SamRefiner(build_tiny_sam(), encoder_attention="flash")
