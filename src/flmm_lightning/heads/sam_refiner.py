"""SAM refiner: coarse mask logits + text embeddings -> fine mask logits at the original image size.

A frozen SAM image encoder and a trainable prompt encoder + mask decoder. Each object is prompted with
the box of its binarised coarse mask, its coarse logits as a mask prompt and its text embeddings as extra
sparse tokens (reference: ``flmm/models/mask_head/mask_refiner.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from flmm_lightning.common.frozen import FrozenParts
from flmm_lightning.common.masks import mask_iou
from flmm_lightning.heads.sam_attention import set_encoder_attention
from flmm_lightning.heads.sam_cache import SamEmbeddingCache, encoder_identity, image_key

# segment-anything's architectures; the tiny one of the demo and the tests is ``assets.sam.build_tiny_sam``.
SAM_NAMES = ("vit_b", "vit_l", "vit_h")


def build_sam(name: str, checkpoint: str | None) -> Sam:
    """``vit_b`` / ``vit_l`` / ``vit_h`` (segment_anything registry); optionally load weights."""
    if name not in SAM_NAMES:
        raise ValueError(f"unknown SAM model {name!r}; expected one of {SAM_NAMES}")
    # Weights are loaded below rather than by the registry: map to CPU, weights_only, clear errors.
    return load_sam_weights(sam_model_registry[name](checkpoint=None), checkpoint, name)


def read_sam_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of SAM's ``.pth`` file, read as a checkpoint is (``weights_only``: nothing in it runs;
    ``mmap``: a tensor's bytes are read when it is copied into the model, after its key and shape matched, so
    a small file declaring huge tensors allocates nothing; a compressed record is refused)."""
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"cannot load SAM checkpoint {checkpoint} safely: {error}") from error


def load_sam_weights(sam: Sam, checkpoint: str | None, name: str) -> Sam:
    """``sam`` in eval mode with the state dict of the file ``checkpoint`` (none: as built); an error names
    the file and the keys that do not match the ``name`` architecture."""
    if checkpoint is not None:
        state_dict = read_sam_weights(checkpoint)
        missing, unexpected = sam.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"SAM checkpoint {checkpoint} does not match the {name!r} architecture: "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
    return sam.eval()


def binarize_coarse(coarse_logits: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """bool ``[n, H, W]``: ``sigmoid`` of the coarse logits ``[n, h, w]``, upsampled bilinearly, ``> 0.5``.

    Sigmoid before the upsampling, as in the reference.
    """
    probs = coarse_logits.detach().float().sigmoid()[:, None]  # [n, 1, h, w]
    return F.interpolate(probs, size=original_size, mode="bilinear")[:, 0] > 0.5  # [n, H, W]


def mask_boxes_exclusive(masks: torch.Tensor) -> torch.Tensor:
    """long ``[n, 4]``: ``[x0, y0, x1 + 1, y1 + 1]`` of each bool mask ``[n, H, W]`` (exclusive right/bottom
    edges, SAM's box prompt), unlike ``torchvision.ops.masks_to_boxes`` (inclusive ``[x0, y0, x1, y1]``).

    An empty mask gives the whole image, ``[0, 0, W, H]``.
    """
    h, w = masks.shape[-2:]
    rows = masks.any(dim=2).to(torch.uint8)  # [n, H]
    cols = masks.any(dim=1).to(torch.uint8)  # [n, W]
    # argmax returns the first maximal index: first occupied row/column, or last one on the flipped axis.
    y0 = rows.argmax(dim=1)
    y1 = h - rows.flip(1).argmax(dim=1)
    x0 = cols.argmax(dim=1)
    x1 = w - cols.flip(1).argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)  # [n, 4]
    whole = torch.tensor([0, 0, w, h], device=masks.device)
    return torch.where(masks.flatten(1).any(dim=1, keepdim=True), boxes, whole)


def resize_boxes(boxes: torch.Tensor, original_size: tuple[int, int], img_size: int) -> torch.Tensor:
    """float32 ``[n, 4]``: boxes in original-image pixels mapped into the resized-image frame.

    ``ResizeLongestSide.apply_boxes`` arithmetic (float64, then float32 like the reference's tensor).
    """
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1], img_size)
    scale = boxes.new_tensor([new_w / original_size[1], new_h / original_size[0]] * 2, dtype=torch.float64)
    return (boxes.double() * scale).float()


def prompt_masks(
    coarse_logits: torch.Tensor, input_size: tuple[int, int], img_size: int, mask_input_size: tuple[int, int]
) -> torch.Tensor:
    """Mask prompts ``[n, 1, *mask_input_size]`` from coarse logits ``[n, h, w]``.

    Resized to the resized-image size, padded right/bottom to the encoder size with
    ``min(-1, min logit over the image's objects)`` (the padded image area is background), then resized to
    the prompt encoder's mask input size. Differentiable w.r.t. the logits; the pad value is not.
    """
    dtype = coarse_logits.dtype
    n = coarse_logits.shape[0]
    resized = F.interpolate(coarse_logits[:, None].float(), size=input_size, mode="bilinear").to(dtype)
    pad_value = coarse_logits.detach().amin().clamp(max=-1.0)
    padded = pad_value.expand(n, 1, img_size, img_size).clone()  # [n, 1, S, S]
    padded[..., : input_size[0], : input_size[1]] = resized
    return F.interpolate(padded.float(), size=mask_input_size, mode="bilinear").to(dtype)


def select_candidate(fine: torch.Tensor, coarse_binary: torch.Tensor) -> torch.Tensor:
    """``[g, H, W]``: per object the candidate of ``fine`` ``[g, k, H, W]`` whose ``> 0`` mask has the highest
    IoU with the binarised coarse mask ``[g, H, W]`` (the first one on ties; an empty candidate of an empty
    coarse mask scores 0, as in the reference)."""
    g = fine.shape[0]
    candidates = fine.detach() > 0  # [g, k, H, W]
    target = coarse_binary[:, None].expand_as(candidates)  # [g, k, H, W]
    best = mask_iou(candidates, target, empty=0.0).argmax(dim=1)  # [g]
    return fine[torch.arange(g, device=fine.device), best]


class SamRefiner(FrozenParts):
    """Frozen SAM image encoder + trainable prompt encoder and mask decoder.

    The image encoder is a frozen part (``FrozenParts``): it never trains, stays in eval mode and is left out
    of ``state_dict()``; loading a state dict without its keys keeps the encoder's current weights.

    ``embedding_cache``: a directory for ``SamEmbeddingCache`` (off when None). With it, ``encode_images``
    returns every embedding rounded to float16, computed or read back, so results do not depend on whether an
    image was cached; disk cost 2 MiB per image for ViT-B/L/H (see ``SamEmbeddingCache``).

    ``encoder_attention``: ``"sdpa"`` runs the encoder's attention as one fused call per block
    (``sam_attention``), ``"reference"`` as segment-anything writes it; same function. ``encoder_batch_size``:
    images per encoder call; it bounds the encoder's transient memory (``reference`` attention writes
    ``[heads, 4096, 4096]`` logits per 1024-px image in its global blocks, ``sdpa`` nothing of that size).
    """

    frozen_parts = ("sam.image_encoder",)

    def __init__(
        self,
        sam: Sam,
        use_text: bool = True,
        use_mask: bool = True,
        use_box: bool = True,
        multimask_output: bool = False,
        embedding_cache: str | os.PathLike | None = None,
        encoder_attention: str = "sdpa",
        encoder_batch_size: int = 4,
    ) -> None:
        super().__init__()
        if encoder_batch_size < 1:
            raise ValueError(f"encoder_batch_size must be at least 1, got {encoder_batch_size}")
        self.sam = sam
        self.use_text = use_text
        self.use_mask = use_mask
        self.use_box = use_box
        self.multimask_output = multimask_output
        self.embedding_cache = SamEmbeddingCache(embedding_cache) if embedding_cache is not None else None
        self._encoder_id: str | None = None
        self.encoder_batch_size = encoder_batch_size
        self.freeze_parts()
        self.set_encoder_attention(encoder_attention)

    def set_encoder_attention(self, name: str) -> None:
        """``"sdpa"`` | ``"reference"``: how the frozen image encoder computes attention (same weights)."""
        set_encoder_attention(self.sam.image_encoder, name)

    @property
    def img_size(self) -> int:
        return self.sam.image_encoder.img_size

    @property
    def embed_dim(self) -> int:
        """Width of SAM's prompt tokens: the text projection must output this."""
        return self.sam.prompt_encoder.embed_dim

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        """``(C, He, We)`` of one image embedding, as the mask decoder expects it."""
        prompt_encoder = self.sam.prompt_encoder
        return (prompt_encoder.embed_dim, *prompt_encoder.image_embedding_size)

    @property
    def encoder_id(self) -> str:
        """Identity of the frozen image encoder for the embedding cache, hashed on first use."""
        if self._encoder_id is None:
            self._encoder_id = encoder_identity(self.sam.image_encoder, self.img_size)
        return self._encoder_id

    @torch.no_grad()
    def encode_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Image embeddings ``[B, C, He, We]`` of resized uint8 images ``[3, h_b, w_b]``.

        The images come from ``data.images.sam_input_image`` (longer side = ``img_size``). With the embedding
        cache on, only the images without a valid entry go through the encoder, as one batch; images still on
        the CPU are hashed there, without waiting for the device.
        """
        if self.embedding_cache is None:
            return self._run_encoder(images)
        cache, encoder_id, shape = self.embedding_cache, self.encoder_id, self.embedding_shape
        keys = [image_key(image) for image in images]
        embeddings: list[torch.Tensor | None] = [cache.load(key, encoder_id, shape) for key in keys]
        misses = [b for b, embedding in enumerate(embeddings) if embedding is None]
        if misses:
            computed = self._run_encoder([images[b] for b in misses]).half()  # [m, C, He, We]
            for b, embedding, on_host in zip(misses, computed, computed.cpu(), strict=True):
                cache.store(keys[b], encoder_id, on_host)
                embeddings[b] = embedding
        dtype = self.sam.image_encoder.patch_embed.proj.weight.dtype
        return torch.stack([embedding.to(device=self.sam.device, dtype=dtype) for embedding in embeddings])

    def _run_encoder(self, images: list[torch.Tensor]) -> torch.Tensor:
        encoder = self.sam.image_encoder
        dtype = encoder.patch_embed.proj.weight.dtype
        # Sam.preprocess: SAM's pixel normalisation, then zero padding right/bottom to img_size.
        batch = [self.sam.preprocess(image.to(self.sam.device)) for image in images]  # [3, S, S] each
        chunks = [
            encoder(torch.stack(batch[start : start + self.encoder_batch_size]).to(dtype))
            for start in range(0, len(batch), self.encoder_batch_size)
        ]
        return torch.cat(chunks)  # [B, C, He, We]

    def forward(
        self,
        image_embeddings: torch.Tensor,
        coarse_logits: list[torch.Tensor],
        text_embeddings: list[list[torch.Tensor]],
        input_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[torch.Tensor]:
        """Fine logits ``[n_b, H_b, W_b]`` per image.

        image_embeddings: ``[B, C, He, We]`` from ``encode_images``; coarse_logits: per image
        ``[n_b, h_b, w_b]`` (processor padding already removed); text_embeddings: per image, per object
        ``[t, C]``; input_sizes: resized image ``(h, w)``; original_sizes: image ``(H, W)``.
        """
        return [
            self._refine_image(image_embeddings[b : b + 1], coarse, texts, input_size, original_size)
            for b, (coarse, texts, input_size, original_size) in enumerate(
                zip(coarse_logits, text_embeddings, input_sizes, original_sizes, strict=True)
            )
        ]

    def _refine_image(
        self,
        image_embedding: torch.Tensor,
        coarse_logits: torch.Tensor,
        text_embeddings: list[torch.Tensor],
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        # image_embedding: [1, C, He, We]; coarse_logits: [n, h, w]
        n = coarse_logits.shape[0]
        if n == 0:
            return coarse_logits.new_zeros((0, *original_size))
        coarse_binary = binarize_coarse(coarse_logits, original_size)  # [n, H, W]
        boxes = None
        if self.use_box:
            boxes = resize_boxes(mask_boxes_exclusive(coarse_binary), original_size, self.img_size)  # [n, 4]
        masks = None
        if self.use_mask:
            mask_input_size = self.sam.prompt_encoder.mask_input_size
            masks = prompt_masks(coarse_logits, input_size, self.img_size, mask_input_size)  # [n, 1, M, M]

        # Objects with different text lengths cannot share a sparse-token tensor (padding tokens would be
        # attended to), so objects are batched per token count.
        groups: dict[int, list[int]] = {}
        for k, text in enumerate(text_embeddings):
            groups.setdefault(text.shape[0] if self.use_text else 0, []).append(k)

        order, fine = [], []
        for members in groups.values():
            index = torch.tensor(members, device=coarse_logits.device)
            texts = torch.stack([text_embeddings[k] for k in members]) if self.use_text else None  # [g, t, C]
            fine.append(
                self._refine_group(
                    image_embedding,
                    None if boxes is None else boxes[index],
                    None if masks is None else masks[index],
                    texts,
                    coarse_binary[index],
                    input_size,
                    original_size,
                )
            )
            order.append(index)
        return torch.cat(fine)[torch.cat(order).argsort()]  # [n, H, W]

    def _refine_group(
        self,
        image_embedding: torch.Tensor,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        texts: torch.Tensor | None,
        coarse_binary: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        # image_embedding: [1, C, He, We]; boxes: [g, 4]; masks: [g, 1, M, M]; texts: [g, t, C];
        # coarse_binary: [g, H, W]
        g = coarse_binary.shape[0]
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes, masks=masks)
        # Without box and mask prompts the prompt encoder answers for a batch of one.
        dense = dense.expand(g, -1, -1, -1)  # [g, C, He, We]
        sparse = sparse.expand(g, -1, -1).to(dense.dtype)  # [g, 2 | 0, C]
        if texts is not None:
            sparse = torch.cat([sparse, texts.to(dense.dtype)], dim=1)  # [g, 2 + t, C]
        low_res, _ = self.sam.mask_decoder(
            image_embeddings=image_embedding,  # repeated per prompt inside the decoder
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=self.multimask_output,
        )  # [g, k, 4He, 4We], k = 3 if multimask else 1
        fine = self.sam.postprocess_masks(low_res, input_size, original_size)  # [g, k, H, W]
        return select_candidate(fine, coarse_binary) if self.multimask_output else fine[:, 0]  # [g, H, W]
