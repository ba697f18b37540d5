"""The typed objects that cross between rooms, in one leaf module that imports nothing else of the project.

``data/`` produces ``GroundingSample`` (or ``SkippedSample``) and encodes it with a ``PromptBuilder`` into
``PromptInputs``, collated into an ``LMMBatch``; ``lmm/`` implements ``PromptBuilder`` and turns an
``LMMBatch`` into ``GroundingFeatures`` for ``heads/``. Keeping them here lets ``data/`` and ``lmm/`` use
each other's types without importing each other (the import-linter contracts in pyproject.toml).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from PIL import Image

NOT_GROUNDED = -1
# The ungrounded piece after each phrase of a non-narrative sample (RefCOCO, inference): one token, the last
# of the tokeniser's encoding of ".", as the reference appends it (SentencePiece tokenisers give "▁", ".").
PHRASE_SEPARATOR = "."


@dataclass
class GroundingSample:
    """One image with the objects its text refers to.

    ``utterances`` is the text exactly as it goes into the LMM, in order: each piece is tokenised on its
    own (as the reference does) and its tokens belong to object ``index`` or to none (``NOT_GROUNDED``).
    RefCOCO: ``[(phrase_0, 0), (".", -1), (phrase_1, 1), (".", -1), ...]``; PNG: every utterance of the
    narrative, ungrounded ones with -1. ``phrases[k]`` is the text of object ``k``.
    """

    image: Image.Image  # RGB
    phrases: list[str]
    masks: torch.Tensor  # bool [n, H, W] at the image's own size
    is_thing: torch.Tensor  # bool [n]
    is_plural: torch.Tensor  # bool [n]
    image_id: int | str
    file_name: str
    object_ids: list[str]  # ref ids (RefCOCO) or joined PNG segment ids, to trace a result back
    utterances: list[tuple[str, int]] = field(default_factory=list)
    # Trailing objects cut because the text did not fit the LMM's context (``PromptBuilder.fit_to_context``).
    num_dropped_objects: int = 0
    # ReasonSeg: per object, the pixels the benchmark leaves out of the metric (bool [n, H, W]); None: none.
    ignore_masks: torch.Tensor | None = None
    # ReasonSeg: per object, whether its text is a long query (a sentence) rather than a phrase (bool [n]).
    is_sentence: torch.Tensor | None = None
    # The utterances are a narrative (PNG): its ungrounded utterances name nothing, so its tokens label the
    # keyword selector (grounded: positive, the rest: negative). RefCOCO's "phrase . phrase ." is not one.
    narrative: bool = False

    def __post_init__(self) -> None:
        if not self.utterances:
            separator = (PHRASE_SEPARATOR, NOT_GROUNDED)
            self.utterances = [piece for k, p in enumerate(self.phrases) for piece in ((p, k), separator)]

    @classmethod
    def for_inference(
        cls,
        image: Image.Image,
        phrases: list[str],
        image_id: int | str = "input",
        file_name: str = "input",
        utterances: list[tuple[str, int]] | None = None,
    ) -> GroundingSample:
        """An image and the phrases to ground in it, without ground truth (prediction, chat, benchmarks):
        empty masks at the image's size, every object a singular thing, object ids ``"0"``, ``"1"``, ...;
        ``utterances`` as for any sample (by default each phrase followed by ".")."""
        n = len(phrases)
        return cls(
            image=image,
            phrases=list(phrases),
            masks=torch.zeros(n, image.height, image.width, dtype=torch.bool),
            is_thing=torch.ones(n, dtype=torch.bool),
            is_plural=torch.zeros(n, dtype=torch.bool),
            image_id=image_id,
            file_name=file_name,
            object_ids=[str(k) for k in range(n)],
            utterances=list(utterances or []),
        )

    @property
    def num_objects(self) -> int:
        return len(self.phrases)


@dataclass
class SkippedSample:
    """A sample left out under ``on_bad_sample: skip``; travels with the batch so that it is counted."""

    dataset: str
    sample_id: str
    path: str
    reason: str


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


@dataclass
class FrozenFeatures:
    """What the frozen LMM computes for one sample, before anything trainable reads it: the part of
    ``GroundingFeatures`` that a feature cache may keep and serve in later epochs (``feature_store``)."""

    attention_maps: torch.Tensor  # float32 [n, C, h, w]: merged over each object's tokens
    hidden_states: torch.Tensor  # [L, u, D] at the LMM's dtype: last L layers at the hidden-state rows
    hidden_objects: torch.Tensor  # long [u]: object index of each hidden-state row, -1 for none
    padded_hw: tuple[int, int]
    content_box: tuple[int, int, int, int]


class ContextOverflowError(ValueError):
    """A sample whose prompt, image tokens and phrases do not fit the LMM's context (names the sample)."""


class PromptBuilder(ABC):
    """Turns a ``GroundingSample`` into ``PromptInputs``; picklable, runs in dataloader workers.

    Each LMM family implements it in ``lmm/``; ``data/`` calls it without knowing the family."""

    @abstractmethod
    def __call__(self, sample: GroundingSample) -> PromptInputs:
        """Raises ``ContextOverflowError`` when the sample does not fit the LMM's context."""

    @abstractmethod
    def fit_to_context(self, sample: GroundingSample) -> GroundingSample:
        """The sample, or a copy without the trailing objects that do not fit the context (with a warning)."""

    @abstractmethod
    def collate(self, prompts: list[PromptInputs]) -> LMMBatch: ...
