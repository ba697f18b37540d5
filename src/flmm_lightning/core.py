"""The F-LMM model core: frozen LMM -> U-Net mask head -> SAM refiner, and the losses of its predictions.

A plain ``torch.nn.Module``, the one place the stages are wired: the Lightning module (training, evaluation),
``inference.grounder.Grounder``, the bench and the tests all call it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flmm_lightning.boundaries import GroundingFeatures
from flmm_lightning.common.feature_store import FeatureStore
from flmm_lightning.data.batch import GroundingBatch
from flmm_lightning.heads.losses import mask_losses
from flmm_lightning.heads.sam_refiner import SamRefiner
from flmm_lightning.heads.unet import UNetMaskHead, crop_to_content
from flmm_lightning.lmm.base import FrozenLMM
from flmm_lightning.selection.targets import narrative_selector_loss

# The weighted terms of the total loss (``FLMM.loss_weights``).
LOSS_TERMS = ("coarse_bce", "coarse_dice", "fine_bce", "fine_dice")
# The keyword selector's token loss: a term only when the LMM adapter has a selector.
SELECTOR_TERM = "keyword_selector"


@dataclass
class GroundingPrediction:
    """Mask logits of every object of one sample."""

    coarse_logits: torch.Tensor  # [n, h, w] at the U-Net's output size, processor padding removed
    fine_logits: torch.Tensor  # [n, H, W] at the image's own size
    features: GroundingFeatures


class CheckpointMismatchError(RuntimeError):
    """A checkpoint that does not fit this model (other LMM, missing or misshapen trainable weights)."""


class FLMM(nn.Module):
    """Grounds the phrases of a batch: the frozen LMM's attention and hidden states (``lmm``), coarse mask
    logits from the U-Net (``mask_head``), fine ones from the SAM refiner (``sam``).

    ``loss_weights``: weight of each of ``LOSS_TERMS`` in the total loss (1 each by default), and of
    ``SELECTOR_TERM`` (the keyword selector's token loss on narrative samples) when ``lmm`` has a selector.
    ``eval_heads_fp32``: outside training (``.eval()``: validation, test, prediction) the U-Net and SAM run in
    fp32 with autocast off, as in the reference's evaluation, whatever the caller's autocast; the LMM (and the
    text projection that reads it) keeps the caller's precision. Training is unaffected.

    The frozen parts (the LMM's weights, SAM's image encoder) never train, stay in eval mode under
    ``train()`` and are in no state dict (``common.frozen.FrozenParts``): ``trainable_state_dict()`` is what a
    checkpoint keeps.
    """

    def __init__(
        self,
        lmm: FrozenLMM,
        sam: SamRefiner,
        mask_head: UNetMaskHead,
        loss_weights: Mapping[str, float] | None = None,
        eval_heads_fp32: bool = True,
    ) -> None:
        super().__init__()
        self.lmm = lmm
        self.sam = sam
        self.mask_head = mask_head
        weights = dict.fromkeys(LOSS_TERMS, 1.0) | dict(loss_weights or {})
        unknown = sorted(set(weights) - {*LOSS_TERMS, SELECTOR_TERM})
        if unknown:
            raise ValueError(f"unknown loss terms {unknown}; the terms are {(*LOSS_TERMS, SELECTOR_TERM)}")
        if not self.has_keyword_selector:
            weights.pop(SELECTOR_TERM, None)
        self.loss_weights = weights
        self.eval_heads_fp32 = eval_heads_fp32
        # The frozen LMM's feature cache (``data.feature_cache``; set by the entry points): features a batch
        # brings from it skip the LMM, the others are computed and queued to it.
        self.feature_store: FeatureStore | None = None

    @property
    def has_keyword_selector(self) -> bool:
        """Whether the LMM adapter scores answer tokens for grounding (``model.lmm.keyword_selector``)."""
        return getattr(self.lmm, "keyword_selector", None) is not None

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self, batch: GroundingBatch, image_embeddings: torch.Tensor | None = None
    ) -> list[GroundingPrediction]:
        """Mask logits of every object of every sample. ``image_embeddings``: SAM's encoder output for the
        batch's images (``image_embeddings(batch)``), computed here when None."""
        return self.decode(batch, self.lmm_features(batch), image_embeddings)

    def lmm_features(self, batch: GroundingBatch) -> list[GroundingFeatures]:
        """The LMM's features of the batch's samples: from the feature cache when it served every sample,
        else from one LMM forward over the batch (its new entries queued to ``feature_store``)."""
        cached = batch.cached_features
        if cached is not None and all(entry is not None for entry in cached):
            if self.feature_store is not None:
                self.feature_store.stats.served += len(cached)
            return self.lmm.trainable_features(cached)
        if self.feature_store is None or batch.feature_keys is None:
            return self.lmm(batch.lmm)
        frozen = self.lmm.frozen_features(batch.lmm)
        self.feature_store.stats.computed += len(frozen)
        for index, (key, entry) in enumerate(zip(batch.feature_keys, frozen, strict=True)):
            if cached is None or cached[index] is None:
                self.feature_store.put(key, entry)
        return self.lmm.trainable_features(frozen)

    def decode(
        self,
        batch: GroundingBatch,
        features: list[GroundingFeatures],
        image_embeddings: torch.Tensor | None = None,
    ) -> list[GroundingPrediction]:
        """The heads alone on the LMM's ``features`` of the batch's samples: U-Net, then SAM."""
        with self._head_precision():
            coarse = self.coarse_logits(features)
            if image_embeddings is None:
                image_embeddings = self.image_embeddings(batch)
            fine = self.sam(
                image_embeddings,
                coarse,
                [f.text_embeddings for f in features],
                input_sizes=[tuple(image.shape[-2:]) for image in batch.sam_images],
                original_sizes=[(s.image.height, s.image.width) for s in batch.samples],
            )
        return [GroundingPrediction(c, f, feat) for c, f, feat in zip(coarse, fine, features, strict=True)]

    def image_embeddings(self, batch: GroundingBatch) -> torch.Tensor:
        """SAM's frozen encoder on the batch's images, ``[B, C, He, We]`` (through its embedding cache when
        on), at the heads' precision (see the class)."""
        with self._head_precision():
            return self.sam.encode_images(batch.sam_images)

    def coarse_logits(self, features: list[GroundingFeatures]) -> list[torch.Tensor]:
        """Per sample ``[n, h, w]``: the U-Net, run once per distinct grid size (it treats every object
        independently), processor padding removed."""
        by_grid: dict[tuple[int, ...], list[int]] = {}
        for index, feature in enumerate(features):
            by_grid.setdefault(tuple(feature.attention_maps.shape[-2:]), []).append(index)
        coarse: list[torch.Tensor | None] = [None] * len(features)
        dtype = next(self.mask_head.parameters()).dtype
        for indices in by_grid.values():
            maps = torch.cat([features[i].attention_maps for i in indices])  # [sum n, C, h, w]
            logits = self.mask_head(maps.to(dtype))  # [sum n, h', w']
            sizes = [len(features[i].attention_maps) for i in indices]
            for i, chunk in zip(indices, logits.split(sizes), strict=True):
                coarse[i] = crop_to_content(chunk, features[i].padded_hw, features[i].content_box)
        return coarse

    def _head_precision(self) -> contextlib.AbstractContextManager:
        """Autocast off around the heads outside training when ``eval_heads_fp32`` (see the class)."""
        if self.training or not self.eval_heads_fp32:
            return contextlib.nullcontext()
        device_type = next(self.mask_head.parameters()).device.type
        return torch.autocast(device_type=device_type, enabled=False)

    # ----------------------------------------------------------------------------------------- losses
    def losses(
        self, batch: GroundingBatch, predictions: list[GroundingPrediction]
    ) -> dict[str, torch.Tensor]:
        """``loss`` (the weighted sum of ``LOSS_TERMS``, to back-propagate) and every term and statistic
        (``{coarse,fine}_{bce,dice,accuracy,iou}``): per-sample values weighted by the sample's object count,
        as the reference averages them. The batch must hold at least one sample."""
        totals: dict[str, torch.Tensor] = {}
        num_objects = 0
        for sample, prediction in zip(batch.samples, predictions, strict=True):
            gt = sample.masks.to(prediction.fine_logits.device)
            n = sample.num_objects
            for stage, logits in (("coarse", prediction.coarse_logits), ("fine", prediction.fine_logits)):
                stage_losses = mask_losses(logits, gt)
                for name in ("bce", "dice", "accuracy", "iou"):
                    key = f"{stage}_{name}"
                    totals[key] = totals.get(key, 0.0) + getattr(stage_losses, name) * n
            num_objects += n
        averaged = {key: value / num_objects for key, value in totals.items()}
        if SELECTOR_TERM in self.loss_weights:
            logits = [prediction.features.selector_logits for prediction in predictions]
            averaged[SELECTOR_TERM] = narrative_selector_loss(batch.lmm, batch.samples, logits)
        averaged["loss"] = sum(weight * averaged[key] for key, weight in self.loss_weights.items())
        return averaged

    # ----------------------------------------------------------------------------------------- checkpoints
    def trainable_state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: every tensor but the frozen parts', keys relative to this module."""
        return self.state_dict()

    def check_trainable_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Raises ``CheckpointMismatchError`` naming every missing, unexpected, misshapen or other-dtype
        trainable key (shapes and dtypes are read from the tensors' headers: nothing is copied, and a
        memory-mapped checkpoint is not read), then every tensor holding NaN or Inf. A dtype other than the
        model's is refused, never cast: a cast would silently change the weights (fp16, integers, complex)."""
        expected = self.trainable_state_dict()
        problems = []
        missing = sorted(set(expected) - set(state_dict))
        if missing:
            problems.append(f"missing trainable keys: {', '.join(missing[:10])}")
        unexpected = sorted(str(key) for key in set(state_dict) - set(expected))
        if unexpected:
            problems.append(f"keys this model does not have: {', '.join(unexpected[:10])}")
        for key in sorted(set(expected) & set(state_dict)):
            stored, own = state_dict[key], expected[key]
            if not isinstance(stored, torch.Tensor) or stored.layout != torch.strided:
                problems.append(f"{key}: a {type(stored).__name__} in the checkpoint, not a dense tensor")
            elif stored.shape != own.shape:
                problems.append(
                    f"{key}: shape {tuple(stored.shape)} in the checkpoint, {tuple(own.shape)} in the model"
                )
            elif stored.dtype != own.dtype:
                problems.append(f"{key}: dtype {stored.dtype} in the checkpoint, {own.dtype} in the model")
        if not problems:
            nonfinite = [
                key
                for key in sorted(expected)
                if state_dict[key].is_floating_point() and not state_dict[key].isfinite().all()
            ]
            if nonfinite:
                problems.append(f"NaN or Inf weights in {', '.join(nonfinite[:10])}")
        if problems:
            raise CheckpointMismatchError(
                "checkpoint does not fit this model: "
                + "; ".join(problems)
                + f". U-Net input channels follow the LMM (layers x heads = {self.lmm.attention_channels} "
                "here): a checkpoint trained with another LMM does not fit."
            )

    def load_trainable_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Loads a ``trainable_state_dict()``; checked first, so that a mismatch loads nothing."""
        self.check_trainable_state_dict(state_dict)
        self.load_state_dict(state_dict)
