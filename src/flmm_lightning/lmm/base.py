"""What every frozen-LMM adapter provides (its boundary types: ``flmm_lightning.boundaries``)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from flmm_lightning.boundaries import FrozenFeatures, GroundingFeatures, LMMBatch
from flmm_lightning.frozen import FrozenParts


class FrozenLMM(FrozenParts, ABC):
    """A frozen LMM plus the small trainable parts that read it (layer weights, text projection); the LMM is
    one of its ``frozen_parts``."""

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

    def __setstate__(self, state: dict) -> None:
        """Unpickling (``ddp_spawn`` workers, dataloader copies) skips ``PreTrainedModel.__init__``, which is
        where transformers registers the layer outputs a model can record; without that registration in the
        new process, ``output_hidden_states=True`` returns None. Registers every Hugging Face model inside."""
        super().__setstate__(state)
        from flmm_lightning.lmm.compat import restore_output_recording

        restore_output_recording(self)
