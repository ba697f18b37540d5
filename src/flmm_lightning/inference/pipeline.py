"""The one inference pipeline: answer -> read -> select -> decode.

``answer`` has the frozen LMM generate an answer to a prompt about an image (or takes a given answer) and
reads it in one teacher-forced forward over the same prompt plus the answer's token ids (as generated, never
re-tokenised), through the training capture path. ``select_and_decode`` then lets a caller's selector choose
answer-token spans and decodes each span, merged into one object, by the U-Net and SAM as in training;
``ground_answer`` is the four steps in one call. Chat, reasoning segmentation, narration scoring and the
attention view all run on these steps. ``GroundingRunner`` holds the model core and the input encoding of
its checkpoint; every call into the frozen LMM goes through the operations ``lmm.base.FrozenLMM`` declares.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from torchvision.ops import masks_to_boxes
from transformers import PreTrainedTokenizerBase

from flmm_lightning.boundaries import NOT_GROUNDED, ContextOverflowError, GroundingSample, PromptBuilder
from flmm_lightning.common.masks import mask_scores
from flmm_lightning.core import FLMM
from flmm_lightning.data.batch import EncodedDataset, EncodedSample, GroundingBatch, GroundingCollate
from flmm_lightning.data.images import sam_input_image
from flmm_lightning.heads.sam_refiner import binarize_coarse
from flmm_lightning.lmm.base import FrozenLMM
from flmm_lightning.lmm.readout import TokenReadout
from flmm_lightning.selection import AnswerPhrase, token_char_offsets

Span = tuple[int, int]
Turn = tuple[str, str]


class GroundingRunner:
    """The model core with the input encoding of its checkpoint, on the device of the model's weights: what
    the pipeline runs on. ``grounder.Grounder`` is one (loaded from a checkpoint); the Lightning module's
    evaluation of reasoning splits builds one around its own core."""

    def __init__(self, model: FLMM, prompt_builder: PromptBuilder, sam_image_size: int) -> None:
        self.model = model
        self.encode = EncodedDataset([], prompt_builder, sam_image_size)
        self.collate = GroundingCollate(prompt_builder)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def lmm(self) -> FrozenLMM:
        return self.model.lmm

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.encode.prompt_builder.processor.tokenizer


@dataclass
class ReadAnswer:
    """An answer and its teacher-forced read: what a selector chooses spans of."""

    token_ids: list[int]  # the answer's tokens (as generated, or as the given text tokenises)
    text: str
    offsets: list[Span]  # each token's characters in ``text``
    batch: GroundingBatch | None  # the prompt and the answer on the runner's device; None: empty answer
    readout: TokenReadout | None  # every answer token read; None for an empty answer

    def keyword_scores(self, runner: GroundingRunner) -> torch.Tensor:
        """float ``[T_answer]``: the keyword selector's probability of each answer token."""
        return runner.lmm.selector_logits(self.readout)[0].float().sigmoid()


@dataclass
class DecodedSpans:
    """The masks and merged attention of objects given as answer-token spans."""

    fine: torch.Tensor  # bool [n, H, W]
    coarse: torch.Tensor  # bool [n, H, W]
    maps: torch.Tensor  # [n, C, h, w]
    scores: torch.Tensor  # float [n], ``common.masks.mask_scores`` of ``fine``

    def box(self, k: int) -> tuple[float, float, float, float] | None:
        mask = self.fine[k : k + 1]
        return tuple(float(v) for v in masks_to_boxes(mask)[0]) if mask.any() else None


@dataclass
class GroundedSpans:
    """``select_and_decode``'s result: the answer, the phrases the selector chose and their decoded masks."""

    answer: ReadAnswer
    chosen: list[AnswerPhrase]
    decoded: DecodedSpans | None  # None when nothing was chosen


Selector = Callable[[ReadAnswer], Sequence[AnswerPhrase]]


def image_sample(image: Image.Image) -> GroundingSample:
    """The image as a sample without objects: what the prompt builder and SAM's resize take."""
    return GroundingSample(
        image=image,
        phrases=[],
        masks=torch.zeros(0, image.height, image.width, dtype=torch.bool),
        is_thing=torch.zeros(0, dtype=torch.bool),
        is_plural=torch.zeros(0, dtype=torch.bool),
        image_id="chat",
        file_name=getattr(image, "filename", "") or "chat",
        object_ids=[],
    )


def fitting_prompt(
    runner: GroundingRunner,
    sample: GroundingSample,
    turns: list[Turn],
    question: str,
    room: int,
    kept: int = 0,
) -> tuple[str, int]:
    """The conversation prompt with as many of the latest ``turns`` as leave ``room`` tokens of the LMM's
    context for the answer, and how many of the oldest turns were left out (warned). The last ``kept``
    turns and the question are never left out."""
    builder = runner.encode.prompt_builder
    context = builder.context_length
    for dropped in range(len(turns) - kept + 1):
        prompt = builder.conversation_prompt(turns[dropped:], question)
        tokens = builder.conversation_tokens(sample, prompt)
        if tokens + room <= context:
            if dropped:
                warnings.warn(
                    f"the conversation exceeds the LMM's context of {context} tokens: its oldest {dropped} "
                    f"of {len(turns)} earlier turns are left out of the prompt",
                    stacklevel=3,
                )
            return prompt, dropped
    raise ContextOverflowError(
        f"the question with the image (and the answer it asks about) takes {tokens} tokens; with "
        f"max_new_tokens={room} for the reply that exceeds the LMM's context of {context} tokens: ask a "
        "shorter question or lower max_new_tokens"
    )


def encode_turn(
    runner: GroundingRunner, sample: GroundingSample, prompt: str, answer_ids: Sequence[int]
) -> GroundingBatch:
    """The batch of one turn on the runner's device: ``prompt`` with the image, then ``answer_ids``."""
    builder = runner.encode.prompt_builder
    encoded = EncodedSample(
        sample=sample,
        prompt=builder.conversation_inputs(sample, prompt, answer_ids),
        sam_image=sam_input_image(sample.image, runner.encode.sam_image_size),
    )
    return move_data_to_device(runner.collate([encoded]), runner.device)


def generate(runner: GroundingRunner, sample: GroundingSample, prompt: str, **generation: Any) -> list[int]:
    """The LMM's answer token ids to ``prompt`` about ``sample``'s image (``FrozenLMM.generate``)."""
    return runner.lmm.generate(encode_turn(runner, sample, prompt, []).lmm, **generation)


def read(runner: GroundingRunner, batch: GroundingBatch) -> TokenReadout:
    """One teacher-forced forward over ``batch``, reading every utterance token (``FrozenLMM.read``)."""
    return runner.lmm.read(batch.lmm, every_utterance_token=True)


def answer(
    runner: GroundingRunner,
    sample: GroundingSample,
    prompt: str,
    answer_ids: Sequence[int] | None = None,
    **generation: Any,
) -> ReadAnswer:
    """The answer to ``prompt`` about ``sample``'s image (generated unless ``answer_ids`` are given) and its
    teacher-forced read; an empty answer is not read."""
    if answer_ids is None:
        answer_ids = generate(runner, sample, prompt, **generation)
    token_ids = list(answer_ids)
    text, offsets = token_char_offsets(runner.tokenizer, token_ids)
    if not token_ids:
        return ReadAnswer(token_ids, text, offsets, None, None)
    batch = encode_turn(runner, sample, prompt, token_ids)
    return ReadAnswer(token_ids, text, offsets, batch, read(runner, batch))


def decode_token_spans(
    runner: GroundingRunner, batch: GroundingBatch, readout: TokenReadout, spans: Sequence[Span]
) -> DecodedSpans:
    """Masks of the objects whose answer tokens are ``spans`` (token spans of the utterance): each span's
    tokens marked as one object (in place of the batch's own marks, which stay as they are for the caller),
    merged and decoded by the U-Net and SAM as in training."""
    start = int(batch.lmm.utterance_start[0])
    mask_ids = torch.full_like(batch.lmm.mask_ids, NOT_GROUNDED)  # [B, S]
    for k, (first, last) in enumerate(spans):
        mask_ids[0, start + first : start + last] = k
    features = runner.lmm.features(replace(batch.lmm, mask_ids=mask_ids), readout)
    prediction = runner.model.decode(batch, features)[0]
    size = (batch.samples[0].image.height, batch.samples[0].image.width)
    fine_logits = prediction.fine_logits.cpu()  # [n, H, W]
    return DecodedSpans(
        fine=fine_logits > 0,
        coarse=binarize_coarse(prediction.coarse_logits, size).cpu(),
        maps=prediction.features.attention_maps.cpu(),
        scores=mask_scores(fine_logits, fine_logits > 0),
    )


def select_and_decode(runner: GroundingRunner, read_answer: ReadAnswer, select: Selector) -> GroundedSpans:
    """The phrases ``select`` chooses of a read answer, each decoded into a mask (none for an empty answer
    or an empty choice)."""
    if read_answer.batch is None:
        return GroundedSpans(read_answer, [], None)
    chosen = list(select(read_answer))
    if not chosen:
        return GroundedSpans(read_answer, chosen, None)
    spans = [phrase.token_span for phrase in chosen]
    return GroundedSpans(
        read_answer, chosen, decode_token_spans(runner, read_answer.batch, read_answer.readout, spans)
    )


@torch.no_grad()
def ground_answer(
    runner: GroundingRunner,
    sample: GroundingSample,
    prompt: str,
    select: Selector,
    answer_ids: Sequence[int] | None = None,
    **generation: Any,
) -> GroundedSpans:
    """answer -> read -> select -> decode: ``select_and_decode(answer(...), select)``."""
    return select_and_decode(runner, answer(runner, sample, prompt, answer_ids, **generation), select)
