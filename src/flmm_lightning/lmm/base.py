"""What every frozen-LMM adapter provides (its boundary types: ``flmm_lightning.boundaries``)."""

from __future__ import annotations

from abc import ABC, abstractmethod

from flmm_lightning.boundaries import GroundingFeatures, LMMBatch
from flmm_lightning.frozen import FrozenParts


class FrozenLMM(FrozenParts, ABC):
    """A frozen LMM plus the small trainable parts that read it (layer weights, text projection); the LMM is
    one of its ``frozen_parts``."""

    @property
    @abstractmethod
    def attention_channels(self) -> int:
        """Channels of ``GroundingFeatures.attention_maps`` (the U-Net's input channels)."""

    @abstractmethod
    def forward(self, batch: LMMBatch) -> list[GroundingFeatures]: ...

    def __setstate__(self, state: dict) -> None:
        """Unpickling (``ddp_spawn`` workers, dataloader copies) skips ``PreTrainedModel.__init__``, which is
        where transformers registers the layer outputs a model can record; without that registration in the
        new process, ``output_hidden_states=True`` returns None. Registers every Hugging Face model inside."""
        super().__setstate__(state)
        from flmm_lightning.lmm.compat import restore_output_recording

        restore_output_recording(self)
