"""What every frozen-LMM adapter provides (its boundary types: ``flmm_lightning.boundaries``): what training
reads (``forward``, ``frozen_features``, ``trainable_features``) and every operation the inference pipeline
(``flmm_lightning.inference``) calls, so that no inference module reaches past this interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from flmm_lightning.boundaries import FrozenFeatures, GroundingFeatures, LMMBatch
from flmm_lightning.common.frozen import FrozenParts
from flmm_lightning.lmm.readout import TokenReadout


class FrozenLMM(FrozenParts, ABC):
    """A frozen LMM plus the small trainable parts that read it (layer weights, text projection); the LMM is
    one of its ``frozen_parts``."""

    # Set by every adapter's __init__ (the inference pipeline reads them):
    image_token_id: int  # the token id that stands for an image token in ``LMMBatch.input_ids``
    num_heads: int  # attention heads per layer: ``attention_channels`` is layers (x grids) x heads
    keyword_selector: nn.Module | None  # the trainable head scoring utterance tokens; None without one

    @property
    @abstractmethod
    def attention_channels(self) -> int:
        """Channels of ``GroundingFeatures.attention_maps`` (the U-Net's input channels)."""

    @abstractmethod
    def forward(self, batch: LMMBatch) -> list[GroundingFeatures]:
        """``trainable_features(frozen_features(batch))``."""

    @abstractmethod
    def frozen_features(self, batch: LMMBatch) -> list[FrozenFeatures]:
        """Per sample, what the frozen LMM computes (no gradients): what a feature cache keeps."""

    @abstractmethod
    def trainable_features(self, frozen: list[FrozenFeatures]) -> list[GroundingFeatures]:
        """The trainable parts' read-out of ``frozen`` (one batch's, computed now or served by a cache)."""

    @abstractmethod
    def feature_identity(self) -> str:
        """A hash of everything besides the inputs that determines ``frozen_features`` (model, weights, dtype,
        read-out settings): part of every feature-cache key."""

    @abstractmethod
    def generate(self, batch: LMMBatch, **generation: Any) -> list[int]:
        """The frozen LMM's answer token ids to the one prompt of ``batch`` (no answer in it), without the
        end-of-sequence token; ``generation``: transformers' ``generate`` settings."""

    @abstractmethod
    def read(self, batch: LMMBatch, every_utterance_token: bool = False) -> TokenReadout:
        """One teacher-forced forward over ``batch``: attention over the image tokens and layer-mixed hidden
        states at the grounded tokens (every utterance token when ``every_utterance_token``)."""

    @abstractmethod
    def features(self, batch: LMMBatch, readout: TokenReadout) -> list[GroundingFeatures]:
        """Per sample, the objects ``batch.mask_ids`` marks, from ``readout`` (``read`` of this batch)."""

    @abstractmethod
    def selector_logits(self, readout: TokenReadout) -> list[torch.Tensor]:
        """Per sample ``[u_b]``: the keyword selector's logit of every utterance token ``readout`` holds."""

    @abstractmethod
    def image_maps(self, maps: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Maps over the image-token columns ``[n, L, H, N]`` laid out on the image grid:
        ``[n, attention_channels, h, w]``."""

    def __setstate__(self, state: dict) -> None:
        """Unpickling (``ddp_spawn`` workers, dataloader copies) skips ``PreTrainedModel.__init__``, which is
        where transformers registers the layer outputs a model can record; without that registration in the
        new process, ``output_hidden_states=True`` returns None. Registers every Hugging Face model inside."""
        super().__setstate__(state)
        from flmm_lightning.lmm.compat import restore_output_recording

        restore_output_recording(self)
