"""The sample type that leaves ``data/``: one image, its phrases and their ground-truth masks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

NOT_GROUNDED = -1


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
            self.utterances = [
                piece for k, p in enumerate(self.phrases) for piece in ((p, k), (".", NOT_GROUNDED))
            ]

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
