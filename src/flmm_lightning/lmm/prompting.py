"""The chat prompt of every transformers image-text family: the LMM's own template, the phrase tokens after
it, the context limit and padding. A family's builder says only how an image becomes pixel inputs and image
tokens (``ChatPromptBuilder._encode_image``).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

from flmm_lightning.boundaries import (
    NOT_GROUNDED,
    PHRASE_SEPARATOR,
    ContextOverflowError,
    GroundingSample,
    LMMBatch,
    PromptBuilder,
    PromptInputs,
)
from flmm_lightning.lmm.compat import num_image_tokens

DEFAULT_INSTRUCTION = "Please give me a description of the image."


@dataclass
class EncodedImage:
    """The processor's encoding of the chat prompt with one image, and where the image lies on the grid."""

    prompt_ids: torch.Tensor  # long [S_p]: the prompt with its image placeholder expanded
    pixel_inputs: dict[str, torch.Tensor]
    grid_hw: tuple[int, int]
    padded_hw: tuple[int, int]
    content_box: tuple[int, int, int, int]


class ChatPromptBuilder(PromptBuilder):
    """Chat prompt (the LMM's template: user turn with the image and the instruction, generation prompt), then
    each utterance's own tokens.

    The processor is loaded lazily and not pickled, so the builder travels cheaply to dataloader workers.
    The sequence (prompt, image tokens, utterances) must fit ``max_length``, by default the LMM's
    ``max_position_embeddings``: ``__call__`` refuses a sample that does not fit (``ContextOverflowError``);
    ``fit_to_context`` (training) first drops the trailing objects that do not fit.

    ``use_fast``: which image processor turns the image into pixels: ``False`` the PIL one (transformers 4's
    default, the "slow" processor), ``True`` the torchvision one (transformers 5's default); ``None`` leaves
    the choice to transformers. The two differ by float round-off and in their resampling filters.
    """

    # Class names of the processors this family reads (empty: any).
    processor_classes: tuple[str, ...] = ()
    # The remedy the overflow errors end with (a family whose images can take fewer tokens says how).
    fewer_image_tokens_hint: str = "raise model.prompt.max_length if the LMM was trained on longer sequences"

    def __init__(
        self,
        pretrained: str | os.PathLike,
        instruction: str = DEFAULT_INSTRUCTION,
        max_length: int | None = None,
        use_fast: bool | None = None,
    ) -> None:
        self.pretrained = str(pretrained)
        self.instruction = instruction
        self.max_length = max_length
        self.use_fast = use_fast
        self._processor: Any = None
        self._prompt: str | None = None
        self._context: int | None = None
        self._template_tokens: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_processor=None, _prompt=None, _context=None, _template_tokens=None)
        return state

    def _load(self) -> None:
        chosen: dict[str, Any] = {}
        if self.use_fast is not None:
            # transformers 5 names the image processors by backend ("use_fast" is deprecated there).
            backend = "torchvision" if self.use_fast else "pil"
            chosen["image_processor"] = AutoImageProcessor.from_pretrained(
                self.pretrained, backend=backend, trust_remote_code=False
            )
        processor = AutoProcessor.from_pretrained(self.pretrained, trust_remote_code=False, **chosen)
        found = type(processor).__name__
        if self.processor_classes and found not in self.processor_classes:
            expected = " or ".join(self.processor_classes)
            raise ValueError(f"{self.pretrained}: expected a {expected}, found {found}")
        self._configure(processor)
        content = [{"type": "image"}, {"type": "text", "text": self.instruction}]
        messages = [{"role": "user", "content": content}]
        self._prompt = self._grounding_prompt(processor, messages)
        # Tokenised as the processor does it (special tokens such as BOS included); the one image placeholder
        # becomes as many tokens as the image has.
        self._template_tokens = len(processor.tokenizer(self._prompt)["input_ids"]) - 1
        config = AutoConfig.from_pretrained(self.pretrained, trust_remote_code=False)
        # Rotary positions do not stop at max_position_embeddings (nothing fails beyond it, the model just was
        # never trained there), so the limit is enforced here.
        self._context = self.max_length or getattr(config, "text_config", config).max_position_embeddings
        self._processor = processor

    def _configure(self, processor: Any) -> None:
        """Family settings read from the freshly loaded processor (before the prompt is built)."""

    def _grounding_prompt(self, processor: Any, messages: list[dict[str, Any]]) -> str:
        """The text before the utterances: by default the chat template's, with the generation prompt."""
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @property
    def processor(self) -> Any:
        if self._processor is None:
            self._load()
        return self._processor

    @property
    def context_length(self) -> int:
        """The most tokens a sample may have: ``max_length``, else the LMM's ``max_position_embeddings``."""
        if self._context is None:
            self._load()
        return self._context

    def _image_tokens(self, sample: GroundingSample) -> int:
        """How many tokens the processor gives this sample's image (cheap: no pixels are processed); by
        default the processor's own count for the image's size."""
        return num_image_tokens(self.processor, sample.image.height, sample.image.width)

    @abstractmethod
    def _encode_image(self, sample: GroundingSample, prompt: str) -> EncodedImage:
        """The processor run on ``prompt`` (chat-template text with one image placeholder) and this sample's
        image."""

    def _collate_pixels(self, pixel_inputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The samples' pixel inputs as the model takes them for a batch: by default every input's samples
        concatenated on the first axis (images, or Qwen's patches with ``image_grid_thw`` marking each
        image's end)."""
        return {key: torch.cat([p[key] for p in pixel_inputs], dim=0) for key in pixel_inputs[0]}

    def _prompt_tokens(self, sample: GroundingSample) -> int:
        image_tokens = self._image_tokens(sample)  # loads the processor on first use
        return self._template_tokens + image_tokens

    def fit_to_context(self, sample: GroundingSample) -> GroundingSample:
        """``sample`` itself when it fits the context; else a copy without the trailing objects that do not.

        Rule: the utterances are cut after the last utterance of the last object whose utterances all fit;
        objects from there on are dropped with their masks (``num_dropped_objects`` counts them), and a
        warning names the sample. Attention is causal, so the kept objects' maps are exactly those of the
        full sequence. An utterance of a dropped object that lies before the cut stays as plain context.
        When only ungrounded text after the last object overflows, that text is cut without a warning: no
        object's maps or hidden states depend on it.
        """
        counts = [len(self._piece_ids(sample, text, obj)) for text, obj in sample.utterances]
        prompt_tokens = self._prompt_tokens(sample)
        budget = self.context_length - prompt_tokens
        if sum(counts) <= budget:
            return sample
        fitting, used = 0, 0  # the longest prefix of utterances that fits: its length and its tokens
        while fitting < len(counts) and used + counts[fitting] <= budget:
            used += counts[fitting]
            fitting += 1
        last_utterance: dict[int, int] = {}
        for position, (_, obj) in enumerate(sample.utterances):
            last_utterance[obj] = position
        kept = 0
        while kept < sample.num_objects and last_utterance.get(kept, fitting) < fitting:
            kept += 1
        if kept == 0:
            raise ContextOverflowError(
                f"sample {sample.image_id} ({sample.file_name}): not even its first object fits the LMM's "
                f"context of {self.context_length} tokens (the prompt with the image takes {prompt_tokens}); "
                f"{self.fewer_image_tokens_hint}"
            )
        cut = max(last_utterance[k] for k in range(kept)) + 1
        dropped = sample.num_objects - kept
        if dropped:
            warnings.warn(
                f"sample {sample.image_id} ({sample.file_name}): {prompt_tokens + sum(counts)} tokens exceed "
                f"the LMM's context of {self.context_length}; its last {dropped} of {sample.num_objects} "
                "objects are dropped",
                stacklevel=2,
            )
        return dataclasses.replace(
            sample,
            phrases=sample.phrases[:kept],
            masks=sample.masks[:kept],
            is_thing=sample.is_thing[:kept],
            is_plural=sample.is_plural[:kept],
            object_ids=sample.object_ids[:kept],
            utterances=[(text, obj if obj < kept else NOT_GROUNDED) for text, obj in sample.utterances[:cut]],
            num_dropped_objects=sample.num_dropped_objects + dropped,
            ignore_masks=None if sample.ignore_masks is None else sample.ignore_masks[:kept],
            is_sentence=None if sample.is_sentence is None else sample.is_sentence[:kept],
        )

    def _piece_ids(self, sample: GroundingSample, text: str, obj: int) -> list[int]:
        """The token ids of one utterance, tokenised on its own as the reference does (a phrase's tokens
        never depend on its neighbours); a non-narrative sample's separator is the last of its ids."""
        ids = self.processor.tokenizer.encode(text, add_special_tokens=False)
        if not sample.narrative and obj == NOT_GROUNDED and text == PHRASE_SEPARATOR:
            return ids[-1:]
        return ids

    def _utterance_ids(self, sample: GroundingSample) -> tuple[list[int], list[int]]:
        input_ids: list[int] = []
        mask_ids: list[int] = []
        tokens_per_object = [0] * sample.num_objects
        for text, obj in sample.utterances:
            if obj >= sample.num_objects:
                raise ValueError(
                    f"sample {sample.image_id} ({sample.file_name}): utterance {text!r} refers to object "
                    f"{obj}, but there are {sample.num_objects} phrases"
                )
            ids = self._piece_ids(sample, text, obj)
            input_ids += ids
            mask_ids += [obj] * len(ids)
            if obj >= 0:
                tokens_per_object[obj] += len(ids)
        empty = [k for k, count in enumerate(tokens_per_object) if count == 0]
        if empty:
            phrases = {k: sample.phrases[k] for k in empty}
            raise ValueError(
                f"sample {sample.image_id} ({sample.file_name}): objects {empty} own no tokens "
                f"(phrases {phrases})"
            )
        return input_ids, mask_ids

    def __call__(self, sample: GroundingSample) -> PromptInputs:
        utterance_ids, utterance_mask_ids = self._utterance_ids(sample)
        # Also refuses, with the sample named, an image the processor would reject deep inside.
        total = self._prompt_tokens(sample) + len(utterance_ids)
        if total > self.context_length:
            raise ContextOverflowError(
                f"sample {sample.image_id} ({sample.file_name}): {total} tokens exceed the LMM's context of "
                f"{self.context_length}. Training drops trailing objects to fit; evaluation and prediction "
                "refuse, since leaving objects out would change the metric: give fewer phrases per sample "
                f"(RefCOCO: group_by_image=false), or {self.fewer_image_tokens_hint}"
            )
        encoded = self._encode_image(sample, self._prompt)
        prompt_ids = encoded.prompt_ids  # [S_p]
        input_ids = torch.cat([prompt_ids, torch.tensor(utterance_ids, dtype=torch.long)])  # [S]
        mask_ids = torch.cat(
            [torch.full_like(prompt_ids, -1), torch.tensor(utterance_mask_ids, dtype=torch.long)]
        )  # [S]
        return PromptInputs(
            input_ids=input_ids,
            mask_ids=mask_ids,
            utterance_start=prompt_ids.shape[0],
            pixel_inputs=encoded.pixel_inputs,
            grid_hw=encoded.grid_hw,
            padded_hw=encoded.padded_hw,
            content_box=encoded.content_box,
        )

    def conversation_prompt(self, turns: Sequence[tuple[str, str]], question: str) -> str:
        """The chat template's text of a conversation about one image: the image in the first user turn,
        the earlier ``(question, answer)`` turns, then ``question`` and the generation prompt."""
        messages: list[dict[str, Any]] = []
        for asked, answered in [*turns, (question, None)]:
            content = [{"type": "text", "text": asked}]
            if not messages:
                content.insert(0, {"type": "image"})
            messages.append({"role": "user", "content": content})
            if answered is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answered}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def conversation_tokens(self, sample: GroundingSample, prompt: str) -> int:
        """How many tokens ``prompt`` (``conversation_prompt``) takes with ``sample``'s image in it, counted
        without processing any pixels."""
        return len(self.processor.tokenizer(prompt)["input_ids"]) - 1 + self._image_tokens(sample)

    def conversation_inputs(
        self, sample: GroundingSample, prompt: str, answer_ids: Sequence[int]
    ) -> PromptInputs:
        """``prompt`` with ``sample``'s image, then the answer's token ids as they were generated (not
        re-tokenised) as the one utterance; every mask id is -1 (the caller marks the phrases)."""
        encoded = self._encode_image(sample, prompt)
        prompt_ids = encoded.prompt_ids  # [S_p]
        answer = torch.tensor(list(answer_ids), dtype=torch.long)  # [S_a]
        return PromptInputs(
            input_ids=torch.cat([prompt_ids, answer]),
            mask_ids=torch.full((prompt_ids.shape[0] + answer.shape[0],), NOT_GROUNDED, dtype=torch.long),
            utterance_start=prompt_ids.shape[0],
            pixel_inputs=encoded.pixel_inputs,
            grid_hw=encoded.grid_hw,
            padded_hw=encoded.padded_hw,
            content_box=encoded.content_box,
        )

    def collate(self, prompts: list[PromptInputs]) -> LMMBatch:
        tokenizer = self.processor.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batch, length = len(prompts), max(p.input_ids.shape[0] for p in prompts)
        input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        mask_ids = torch.full((batch, length), -1, dtype=torch.long)
        for b, p in enumerate(prompts):
            s = p.input_ids.shape[0]
            input_ids[b, :s] = p.input_ids
            attention_mask[b, :s] = 1
            mask_ids[b, :s] = p.mask_ids
        return LMMBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mask_ids=mask_ids,
            utterance_start=torch.tensor([p.utterance_start for p in prompts], dtype=torch.long),
            pixel_inputs=self._collate_pixels([p.pixel_inputs for p in prompts]),
            grid_hw=[p.grid_hw for p in prompts],
            padded_hw=[p.padded_hw for p in prompts],
            content_box=[p.content_box for p in prompts],
        )
