import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from flmm_lightning.assets.sam import build_tiny_sam
from flmm_lightning.data.images import sam_input_image
from flmm_lightning.heads import (
    SamRefiner,
    binarize_coarse,
    build_sam,
    mask_boxes_exclusive,
    resize_boxes,
    select_candidate,
)

ORIGINAL = (150, 200)  # (H, W), deliberately not square


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(0)
    return build_tiny_sam()


def make_refiner(sam, **kwargs) -> SamRefiner:
    refiner = SamRefiner(sam, **kwargs)
    refiner.sam.load_state_dict(sam.state_dict())
    return refiner


def image_inputs(refiner: SamRefiner, sizes: list[tuple[int, int]]):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    resized = [sam_input_image(image, refiner.img_size) for image in images]
    return refiner.encode_images(resized), [tuple(r.shape[-2:]) for r in resized]


def coarse_logits(n: int, hw: tuple[int, int] = (48, 64)) -> torch.Tensor:
    """Blobs at different places; object 1 is empty (all background)."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(n, *hw, generator=generator) - 4.0
    for k in range(n):
        if k != 1:
            logits[k, 3 * k : 3 * k + 10 + k, 5 + 4 * k : 20 + 5 * k] += 8.0
    return logits


def reference_refine(sam, embedding, coarse, texts, input_size, original_size, multimask):
    """One object at a time with the plain segment_anything modules, as the reference does."""
    img_size = sam.image_encoder.img_size
    transform = ResizeLongestSide(img_size)
    pad_value = min(-1.0, coarse.min().item())
    resized = F.interpolate(coarse[:, None], size=input_size, mode="bilinear")
    h, w = resized.shape[-2:]
    padded = F.pad(resized, (0, img_size - w, 0, img_size - h), value=pad_value)
    prompts = F.interpolate(padded, size=sam.prompt_encoder.mask_input_size, mode="bilinear")
    binary = (F.interpolate(coarse[None].sigmoid(), size=original_size, mode="bilinear")[0] > 0.5).float()
    outputs = []
    for prompt, mask, text in zip(prompts, binary, texts, strict=True):
        if mask.sum() > 0:
            ys, xs = np.where(mask.numpy() > 0)
            box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        else:
            box = np.array([0.0, 0.0, original_size[1], original_size[0]])
        box = torch.as_tensor(transform.apply_boxes(box, original_size), dtype=torch.float32)
        sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=prompt[None])
        sparse = torch.cat([sparse, text[None]], dim=1)
        low_res, _ = sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        fine = sam.postprocess_masks(low_res, input_size, original_size)[0]
        if multimask:
            candidates = (fine > 0).float().flatten(1)
            target = mask.flatten()[None]
            inter = (candidates * target).sum(-1)
            ious = inter / ((candidates + target - candidates * target).sum(-1) + 1e-12)
            fine = fine[ious.argmax()]
        else:
            fine = fine[0]
        outputs.append(fine)
    return torch.stack(outputs)


def test_mask_boxes_exclusive() -> None:
    masks = torch.zeros(3, 7, 9, dtype=torch.bool)
    masks[0, 2:5, 3:4] = True
    masks[2, 6, 8] = True
    masks[2, 0, 1] = True
    boxes = mask_boxes_exclusive(masks)
    assert boxes.tolist() == [[3, 2, 4, 5], [0, 0, 9, 7], [1, 0, 9, 7]]


def test_empty_coarse_mask_prompts_the_whole_image() -> None:
    coarse = torch.full((2, 48, 64), -6.0)
    coarse[1, 10:20, 30:40] = 6.0
    boxes = mask_boxes_exclusive(binarize_coarse(coarse, ORIGINAL))
    assert boxes[0].tolist() == [0, 0, ORIGINAL[1], ORIGINAL[0]]
    assert boxes[1].tolist() != [0, 0, ORIGINAL[1], ORIGINAL[0]]
    resized = resize_boxes(boxes, ORIGINAL, 1024)
    expected = ResizeLongestSide(1024).apply_boxes(boxes.numpy(), ORIGINAL)
    torch.testing.assert_close(resized, torch.as_tensor(expected, dtype=torch.float32))


def test_sam_input_image_matches_resize_longest_side() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8))
    tensor = sam_input_image(image, 256)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 192, 256)
    expected = ResizeLongestSide(256).apply_image(np.asarray(image))
    assert torch.equal(tensor, torch.from_numpy(expected).permute(2, 0, 1))


def test_refiner_outputs_at_original_size(tiny_sam) -> None:
    refiner = make_refiner(tiny_sam)
    sizes = [ORIGINAL, (90, 60)]
    embeddings, input_sizes = image_inputs(refiner, sizes)
    assert embeddings.shape == (2, 64, 16, 16)
    coarse = [coarse_logits(3), coarse_logits(2, (64, 43))]
    texts = [[torch.randn(2, 64) for _ in range(3)], [torch.randn(1, 64) for _ in range(2)]]
    fine = refiner(embeddings, coarse, texts, input_sizes, sizes)
    assert [f.shape for f in fine] == [(3, *sizes[0]), (2, *sizes[1])]
    empty = refiner(embeddings[:1], [torch.zeros(0, 48, 64)], [[]], input_sizes[:1], sizes[:1])
    assert empty[0].shape == (0, *sizes[0])


@pytest.mark.parametrize("multimask", [False, True])
def test_batched_objects_match_one_by_one(tiny_sam, multimask: bool) -> None:
    torch.manual_seed(0)
    refiner = make_refiner(tiny_sam, multimask_output=multimask)
    embeddings, input_sizes = image_inputs(refiner, [ORIGINAL])
    coarse = coarse_logits(5)
    texts = [torch.randn(t, 64) for t in (2, 3, 2, 1, 3)]
    with torch.no_grad():
        fine = refiner(embeddings, [coarse], [texts], input_sizes, [ORIGINAL])[0]
        expected = reference_refine(
            refiner.sam, embeddings, coarse, texts, input_sizes[0], ORIGINAL, multimask
        )
    torch.testing.assert_close(fine, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("use_box", "use_mask", "use_text"), [(False, True, True), (True, False, True), (False, False, False)]
)
def test_prompt_subsets(tiny_sam, use_box: bool, use_mask: bool, use_text: bool) -> None:
    refiner = make_refiner(tiny_sam, use_box=use_box, use_mask=use_mask, use_text=use_text)
    embeddings, input_sizes = image_inputs(refiner, [ORIGINAL])
    texts = [torch.randn(t, 64) for t in (2, 1, 2)]
    with torch.no_grad():
        fine = refiner(embeddings, [coarse_logits(3)], [texts], input_sizes, [ORIGINAL])[0]
    assert fine.shape == (3, *ORIGINAL) and torch.isfinite(fine).all()


def test_runs_under_bf16_autocast(tiny_sam) -> None:
    refiner = make_refiner(tiny_sam)
    embeddings, input_sizes = image_inputs(refiner, [ORIGINAL])
    texts = [torch.randn(t, 64) for t in (2, 1)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fine = refiner(embeddings, [coarse_logits(2)], [texts], input_sizes, [ORIGINAL])[0]
    assert fine.shape == (2, *ORIGINAL) and torch.isfinite(fine.float()).all()


def test_select_candidate_by_iou_with_coarse_mask() -> None:
    coarse = torch.zeros(3, 4, 4, dtype=torch.bool)
    coarse[0, :2] = True  # top half
    coarse[1, :, :2] = True  # left half
    fine = torch.full((3, 3, 4, 4), -1.0)
    fine[:, 0, :2, :] = 2.0  # top half
    fine[:, 1, :, :2] = 3.0  # left half
    fine[:, 2] = 1.0  # everything
    chosen = select_candidate(fine, coarse)
    # Object 2 has an empty coarse mask: every IoU is 0, the first candidate wins.
    assert torch.equal(chosen, fine[[0, 1, 2], [0, 1, 0]])


def test_gradients_reach_coarse_logits_text_and_decoder_only(tiny_sam) -> None:
    refiner = make_refiner(tiny_sam).train()
    embeddings, input_sizes = image_inputs(refiner, [ORIGINAL])
    coarse = coarse_logits(2).requires_grad_()
    texts = [torch.randn(2, 64, requires_grad=True), torch.randn(1, 64, requires_grad=True)]
    fine = refiner(embeddings, [coarse], [texts], input_sizes, [ORIGINAL])[0]
    fine.sigmoid().mean().backward()
    assert coarse.grad.abs().sum() > 0
    assert all(t.grad.abs().sum() > 0 for t in texts)
    assert refiner.sam.mask_decoder.output_upscaling[0].weight.grad is not None
    assert refiner.sam.prompt_encoder.mask_downscaling[0].weight.grad is not None
    assert all(p.grad is None for p in refiner.sam.image_encoder.parameters())


def test_image_encoder_frozen_and_not_saved(tiny_sam) -> None:
    refiner = make_refiner(tiny_sam)
    assert not any(p.requires_grad for p in refiner.sam.image_encoder.parameters())
    assert all(p.requires_grad for p in refiner.sam.mask_decoder.parameters())
    refiner.train()
    assert refiner.training and refiner.sam.mask_decoder.training
    assert not refiner.sam.image_encoder.training

    parent = nn.ModuleDict({"refiner": refiner, "other": nn.Linear(2, 2)})
    state = parent.state_dict()
    assert not any(".image_encoder." in key for key in state)
    assert "refiner.sam.mask_decoder.iou_token.weight" in state
    assert "refiner.sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in state

    torch.manual_seed(123)
    fresh = nn.ModuleDict({"refiner": SamRefiner(build_tiny_sam()), "other": nn.Linear(2, 2)})
    encoder_before = {k: v.clone() for k, v in fresh["refiner"].sam.image_encoder.state_dict().items()}
    fresh.load_state_dict(state)  # strict
    for key, value in fresh["refiner"].sam.image_encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key])
    torch.testing.assert_close(
        fresh["refiner"].sam.mask_decoder.iou_token.weight, refiner.sam.mask_decoder.iou_token.weight
    )


def test_sam_weights_load_and_a_mismatch_is_reported(tiny_sam, tmp_path) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(tiny_sam.state_dict(), path)
    loaded = build_tiny_sam(str(path))
    for key, value in tiny_sam.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)

    broken = dict(tiny_sam.state_dict())
    del broken["mask_decoder.iou_token.weight"]
    broken_path = tmp_path / "broken.pth"
    torch.save(broken, broken_path)
    with pytest.raises(ValueError, match="mask_decoder.iou_token.weight") as error:
        build_tiny_sam(str(broken_path))
    assert str(broken_path) in str(error.value)
    # segment-anything's names only: the tiny architecture is a test asset (assets.sam), not a product choice
    for name in ("vit_x", "tiny"):
        with pytest.raises(ValueError, match="unknown SAM"):
            build_sam(name, None)


def test_build_vit_b() -> None:
    start = time.perf_counter()
    sam = build_sam("vit_b", None)
    assert time.perf_counter() - start < 30
    assert sam.image_encoder.img_size == 1024
    assert sam.prompt_encoder.mask_input_size == (256, 256)
    assert 85e6 < sum(p.numel() for p in sam.parameters()) < 100e6
