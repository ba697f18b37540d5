"""What every frozen-LMM adapter provides, and the typed objects that cross the ``lmm/`` boundary."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from flmm_lightning.data.sample import GroundingSample


@dataclass
class PromptInputs:
    """One sample encoded for the LMM (built in dataloader workers by a ``PromptBuilder``)."""

    input_ids: torch.Tensor  # long [S]: chat prompt with image tokens, then the utterance tokens
    mask_ids: torch.Tensor  # long [S]: object index per token, -1 elsewhere
    utterance_start: int  # where the utterances begin: the length of the prompt (image tokens included)
    pixel_inputs: dict[str, torch.Tensor]  # processor outputs for this image (pixel_values, image_grid_thw)
    grid_hw: tuple[int, int]  # attention-map grid (h, w) of this image
    padded_hw: tuple[int, int]  # size (pixels) of the processed image the grid covers, padding included
    content_box: tuple[int, int, int, int]  # (top, left, height, width) of the real image inside padded_hw


class ContextOverflowError(ValueError):
    """A sample whose prompt, image tokens and phrases do not fit the LMM's context (names the sample)."""


class PromptBuilder(ABC):
    """Turns a ``GroundingSample`` into ``PromptInputs``; picklable, runs in dataloader workers."""

    @abstractmethod
    def __call__(self, sample: GroundingSample) -> PromptInputs:
        """Raises ``ContextOverflowError`` when the sample does not fit the LMM's context."""

    @abstractmethod
    def fit_to_context(self, sample: GroundingSample) -> GroundingSample:
        """The sample, or a copy without the trailing objects that do not fit the context (with a warning)."""

    @abstractmethod
    def collate(self, prompts: list[PromptInputs]) -> LMMBatch: ...


@dataclass
class LMMBatch:
    """A padded batch for one batched LMM forward."""

    input_ids: torch.Tensor  # long [B, S], right-padded
    attention_mask: torch.Tensor  # long [B, S], 0 on padding
    mask_ids: torch.Tensor  # long [B, S], -1 on padding
    utterance_start: torch.Tensor  # long [B]: where each sample's utterances begin (its prompt length)
    pixel_inputs: dict[str, torch.Tensor]  # per-family concatenation of the samples' pixel inputs
    grid_hw: list[tuple[int, int]]
    padded_hw: list[tuple[int, int]]
    content_box: list[tuple[int, int, int, int]]


@dataclass
class GroundingFeatures:
    """What the frozen LMM says about the objects of one sample."""

    attention_maps: torch.Tensor  # float [n, C, h, w]: merged over each object's tokens; C = L*H (2*L*H NeXT)
    text_embeddings: list[torch.Tensor]  # per object: text_proj(mixed hidden states of its tokens) [t_k, D]
    padded_hw: tuple[int, int]
    content_box: tuple[int, int, int, int]
    # The keyword selector's logit of every utterance token, in order [u]; None without a selector.
    selector_logits: torch.Tensor | None = None


class FrozenLMM(nn.Module, ABC):
    """A frozen LMM plus the small trainable parts that read it (layer weights, text projection)."""

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
