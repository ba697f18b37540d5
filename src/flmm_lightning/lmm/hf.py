"""The family-independent halves of every adapter over a transformers image-text model.

``ChatPromptBuilder``: the chat prompt from the LMM's own template, the phrase tokens after it, the context
limit and padding. ``HFGroundingAdapter``: loading and freezing the model, the batched forward with attention
capture, the layer-weighted hidden states and the per-object merge. A family file says only what differs:
how an image becomes pixel inputs and image tokens, and how image-token columns lay out on a grid.
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
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    PretrainedConfig,
)

from flmm_lightning.boundaries import (
    NOT_GROUNDED,
    ContextOverflowError,
    GroundingFeatures,
    GroundingSample,
    LMMBatch,
    PromptBuilder,
    PromptInputs,
)
from flmm_lightning.lmm.base import FrozenLMM
from flmm_lightning.lmm.capture import build_capture
from flmm_lightning.lmm.compat import num_image_tokens
from flmm_lightning.lmm.keyword_selector import KeywordSelector

DEFAULT_INSTRUCTION = "Please give me a description of the image."
# The longest answer ``HFGroundingAdapter.generate`` writes unless told otherwise.
DEFAULT_MAX_NEW_TOKENS = 256


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
        self._prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
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
        tokenizer = self.processor.tokenizer
        counts = [len(tokenizer.encode(text, add_special_tokens=False)) for text, _ in sample.utterances]
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

    def _utterance_ids(self, sample: GroundingSample) -> tuple[list[int], list[int]]:
        tokenizer = self.processor.tokenizer
        input_ids: list[int] = []
        mask_ids: list[int] = []
        tokens_per_object = [0] * sample.num_objects
        for text, obj in sample.utterances:
            if obj >= sample.num_objects:
                raise ValueError(
                    f"sample {sample.image_id} ({sample.file_name}): utterance {text!r} refers to object "
                    f"{obj}, but there are {sample.num_objects} phrases"
                )
            # Each piece on its own, as the reference does: a phrase's tokens never depend on its neighbours.
            ids = tokenizer.encode(text, add_special_tokens=False)
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


TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MERGE_MODES = ("mean", "max")


def resolve_dtype(torch_dtype: str) -> torch.dtype:
    if torch_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if torch_dtype not in TORCH_DTYPES:
        raise ValueError(f"torch_dtype must be 'auto', 'float32' or 'bfloat16', got {torch_dtype!r}")
    return TORCH_DTYPES[torch_dtype]


def padded_positions(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of each row, in order, right-padded with 0: ([B, K] long, counts [B])."""
    counts = selected.sum(dim=1)  # [B]
    width = int(counts.max())
    # A stable sort on "not selected" brings the selected positions to the front in sequence order.
    order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :width]  # [B, K]
    valid = torch.arange(width, device=selected.device)[None, :] < counts[:, None]  # [B, K]
    return torch.where(valid, order, torch.zeros_like(order)), counts


def tokens_by_object(token_objects: torch.Tensor, item: int) -> tuple[torch.Tensor, list[int]]:
    """Host-side grouping of a sample's phrase tokens by the object they describe.

    token_objects: long ``[t]`` (CPU), object index per phrase token. Returns the token positions ordered by
    object, in sequence order within an object (``[t]``), and every object's token count.
    """
    counts = torch.bincount(token_objects, minlength=int(token_objects.max()) + 1).tolist()
    empty = [k for k, count in enumerate(counts) if count == 0]
    if empty:
        raise ValueError(f"batch item {item}: objects {empty} own no tokens")
    return torch.argsort(token_objects, stable=True), counts


@dataclass
class TokenReadout:
    """What one forward of the frozen LMM read from a batch (``HFGroundingAdapter.read``): at the attention
    rows, the probabilities over the image tokens; at the hidden-state rows, the layer-mixed hidden states.
    Positions and counts are host tensors, right-padded like ``padded_positions``."""

    attention: torch.Tensor  # [B, L, H, T, N]
    attention_positions: torch.Tensor  # long [B, T]: sequence position of each attention row
    attention_counts: torch.Tensor  # long [B]
    image_token_counts: torch.Tensor  # long [B]
    mixed: torch.Tensor  # [B, T_h, D]: softmax(text_layer_weights)-weighted hidden states (differentiable)
    hidden_positions: torch.Tensor  # long [B, T_h]: sequence position of each hidden-state row
    hidden_counts: torch.Tensor  # long [B]


class HFGroundingAdapter(FrozenLMM):
    """A frozen transformers image-text model read out as phrase-token attention maps and projected hidden
    states. Subclasses name the model types they read and build the model's pixel inputs."""

    # ``config.model_type`` values this adapter reads.
    model_types: tuple[str, ...] = ()
    # Vision attention classes the ``fused`` path swaps for ones that attend over all packed images in one
    # call (``packed_attention``); same weights and maths, transformers' own classes again under ``eager``.
    packed_vision_attention: dict[type[nn.Module], type[nn.Module]] = {}
    frozen_parts = ("model",)

    def __init__(
        self,
        pretrained: str | os.PathLike | PretrainedConfig,
        text_proj_dim: int,
        capture: str = "fused",
        merge: str = "mean",
        torch_dtype: str = "auto",
        trust_remote_code: bool = False,
        keyword_selector: bool = False,
    ) -> None:
        """``pretrained``: a hub id or a local directory; or a config, for a randomly initialised model of
        that architecture (benchmarks: created on the current default device, ``with torch.device(...)``).
        ``keyword_selector``: add the trainable head that scores which utterance tokens name something to
        ground (``lmm.keyword_selector.KeywordSelector``); its logits ride in
        ``GroundingFeatures.selector_logits``."""
        super().__init__()
        if merge not in MERGE_MODES:
            raise ValueError(f"merge must be one of {MERGE_MODES}, got {merge!r}")
        self.merge = merge
        self.capture = build_capture(capture)
        load_kwargs = dict(
            dtype=resolve_dtype(torch_dtype),
            attn_implementation=self.capture.attn_implementation,
            trust_remote_code=trust_remote_code,
        )
        if isinstance(pretrained, PretrainedConfig):
            self.model = AutoModelForImageTextToText.from_config(pretrained, **load_kwargs)
        else:
            self.model = AutoModelForImageTextToText.from_pretrained(str(pretrained), **load_kwargs)
        if self.model.config.model_type not in self.model_types:
            raise ValueError(
                f"{pretrained}: expected a checkpoint of model type {' or '.join(self.model_types)}, "
                f"found {self.model.config.model_type}"
            )
        self.freeze_parts()
        self._select_vision_attention()

        text_config = self.model.config.text_config
        self.num_layers: int = text_config.num_hidden_layers
        self.num_heads: int = text_config.num_attention_heads
        self.image_token_id: int = self.model.config.image_token_id
        self.text_layer_weights = nn.Parameter(torch.ones(self.num_layers))
        self.text_proj = nn.Linear(text_config.hidden_size, text_proj_dim)
        self.keyword_selector = KeywordSelector(text_config.hidden_size) if keyword_selector else None

    @property
    def attention_channels(self) -> int:
        return self.num_layers * self.num_heads

    def set_capture(self, capture: str) -> None:
        """Switches the attention capture (``"eager"`` | ``"fused"``) and the model's attention implementation
        with it; the weights stay as they are."""
        self.capture = build_capture(capture)
        self.model.set_attn_implementation(self.capture.attn_implementation)
        self._select_vision_attention()

    def _select_vision_attention(self) -> None:
        swaps = self.packed_vision_attention
        if self.capture.name != "fused":
            swaps = {packed: original for original, packed in swaps.items()}
        for module in self.model.modules():
            replacement = swaps.get(type(module))
            if replacement is not None:
                module.__class__ = replacement

    def _pixel_inputs(
        self, batch: LMMBatch, image_tokens: torch.Tensor, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """The image keyword arguments of the model for this batch, on ``device``: by default the collated
        processor outputs, pixels in the model's dtype. ``image_tokens``: bool [B, S], True at image tokens.
        """
        return {
            key: value.to(device=device, dtype=self.model.dtype if value.is_floating_point() else value.dtype)
            for key, value in batch.pixel_inputs.items()
        }

    def image_maps(self, maps: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Per-object maps over the image-token columns ``[n, L, H, N]`` laid out as ``[n, C, h, w]``.

        By default the image tokens are the row-major cells of the ``grid_hw`` grid.
        """
        h, w = grid_hw
        if h * w != maps.shape[-1]:
            raise ValueError(f"{maps.shape[-1]} image tokens for a {h}x{w} grid")
        return maps.reshape(maps.shape[0], -1, h, w)  # [n, L*H, h, w], layer-major

    @torch.no_grad()
    def generate(self, batch: LMMBatch, **generation: Any) -> list[int]:
        """The frozen LMM's answer to the one prompt in ``batch`` (``conversation_inputs`` without answer):
        transformers' ``generate``, greedy with at most ``DEFAULT_MAX_NEW_TOKENS`` new tokens unless
        ``generation`` says otherwise (sampling, ``max_new_tokens``, repetition controls pass through).
        Returns the generated token ids up to the first end-of-sequence token, which is left out."""
        if batch.input_ids.shape[0] != 1:
            raise ValueError(
                f"generate answers one prompt at a time, got a batch of {batch.input_ids.shape[0]}"
            )
        device = self.text_layer_weights.device
        image_tokens = (batch.input_ids == self.image_token_id).to(device)  # [1, S]
        settings = {"do_sample": False, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS, **generation}
        sequences = self.model.generate(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            **self._pixel_inputs(batch, image_tokens, device),
            **settings,
        )  # [1, S + new]
        new_ids = sequences[0, batch.input_ids.shape[1] :].tolist()
        stop = self.model.generation_config.eos_token_id
        stop = set(stop if isinstance(stop, list) else [] if stop is None else [stop])
        ends = [i for i, token in enumerate(new_ids) if token in stop]
        return new_ids[: ends[0]] if ends else new_ids

    def forward(self, batch: LMMBatch) -> list[GroundingFeatures]:
        return self.features(batch, self.read(batch))

    def read(self, batch: LMMBatch, every_utterance_token: bool = False) -> TokenReadout:
        """One forward of the frozen LMM over ``batch``, read out at the rows that matter.

        Attention rows: the grounded tokens (mask id >= 0), or every utterance token when
        ``every_utterance_token`` (a conversation, whose phrases are chosen after reading the answer).
        Hidden-state rows: every utterance token when the adapter has a keyword selector or
        ``every_utterance_token``, else the grounded tokens.
        """
        device = self.text_layer_weights.device
        # Every position and count is worked out from host copies of the ids (one copy now if the batch is on
        # the device already), so the loop in ``features`` never waits for the device.
        input_ids_host = batch.input_ids.cpu()  # [B, S]
        grounded_host = batch.mask_ids.cpu() >= 0  # [B, S]
        sequence = torch.arange(input_ids_host.shape[1])  # [S]
        utterance_host = (sequence[None, :] >= batch.utterance_start.cpu()[:, None]) & (
            batch.attention_mask.cpu().bool()
        )  # [B, S]
        attention_rows = utterance_host if every_utterance_token else grounded_host
        read_all = every_utterance_token or self.keyword_selector is not None
        hidden_rows = utterance_host if read_all else grounded_host
        image_tokens_host = input_ids_host == self.image_token_id  # [B, S]
        query_positions_host, query_counts = padded_positions(attention_rows)  # [B, T], [B]
        key_positions_host, key_counts = padded_positions(image_tokens_host)  # [B, N], [B]
        hidden_positions_host, hidden_counts = padded_positions(hidden_rows)  # [B, T_h], [B]
        query_positions = query_positions_host.to(device)
        key_positions = key_positions_host.to(device)
        hidden_positions = hidden_positions_host.to(device)

        inputs = dict(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            **self._pixel_inputs(batch, image_tokens_host.to(device), device),
            output_hidden_states=True,
            use_cache=False,
            # Only hidden states are read; skip the [B, S, vocab] logits.
            logits_to_keep=1,
        )
        with torch.no_grad():
            outputs, attn = self.capture.run(self.model, inputs, query_positions, key_positions)
            # attn: [B, L, H, T, N]
            last_layers = outputs.hidden_states[-self.num_layers :]  # L x [B, S, D]
            batch_size, t, d = hidden_positions.shape[0], hidden_positions.shape[1], last_layers[0].shape[-1]
            rows = hidden_positions[:, :, None].expand(batch_size, t, d)  # [B, T_h, D]
            # Gather before stacking: a stack of the full [L, B, S, D] would be a second copy of every layer.
            hidden = torch.stack([layer.gather(1, rows) for layer in last_layers])  # [L, B, T_h, D]
            del outputs, last_layers

        # Gradients flow into the layer weights (and what reads ``mixed``) from here on.
        layer_weights = torch.softmax(self.text_layer_weights, dim=0)  # [L]
        weighted = hidden.to(layer_weights.dtype) * layer_weights[:, None, None, None]  # [L, B, T_h, D]
        mixed = weighted.sum(dim=0)  # [B, T_h, D]
        return TokenReadout(
            attention=attn,
            attention_positions=query_positions_host,
            attention_counts=query_counts,
            image_token_counts=key_counts,
            mixed=mixed,
            hidden_positions=hidden_positions_host,
            hidden_counts=hidden_counts,
        )

    def selector_logits(self, readout: TokenReadout) -> list[torch.Tensor]:
        """The keyword selector's logit of every utterance token of each sample (``[u_b]``, in order)."""
        if self.keyword_selector is None:
            raise ValueError("this adapter has no keyword selector (model.lmm.keyword_selector=false)")
        logits = self.keyword_selector(readout.mixed)  # [B, T_h]
        return [logits[b, : int(count)] for b, count in enumerate(readout.hidden_counts)]

    def features(self, batch: LMMBatch, readout: TokenReadout) -> list[GroundingFeatures]:
        """Per sample, the objects that ``batch.mask_ids`` marks, from ``readout`` (``read`` of this batch;
        its rows must include every grounded token): merged attention maps, projected hidden states of
        their tokens and, with a keyword selector, the logit of every utterance token."""
        device = self.text_layer_weights.device
        mask_ids_host = batch.mask_ids.cpu()  # [B, S]
        selector = self.selector_logits(readout) if self.keyword_selector is not None else None
        features = []
        for b in range(mask_ids_host.shape[0]):
            t_b, n_b = int(readout.attention_counts[b]), int(readout.image_token_counts[b])
            row_objects = mask_ids_host[b, readout.attention_positions[b, :t_b]]  # [t_b]
            grounded_rows = (row_objects >= 0).nonzero()[:, 0]  # [t] attention rows of grounded tokens
            hidden_objects = mask_ids_host[b, readout.hidden_positions[b, : int(readout.hidden_counts[b])]]
            grounded_hidden = (hidden_objects >= 0).nonzero()[:, 0]  # [t] hidden rows of the same tokens
            if grounded_rows.numel() != int((mask_ids_host[b] >= 0).sum()):
                raise ValueError(f"batch item {b}: the readout holds no attention for some grounded tokens")
            order, counts = tokens_by_object(row_objects[grounded_rows], b)
            sample_attn = readout.attention[b, :, :, :t_b, :n_b].float()  # [L, H, t_b, N]
            merged = self._merge_tokens(sample_attn, grounded_rows[order], counts)  # [n, L, H, N]
            try:
                maps = self.image_maps(merged, batch.grid_hw[b])  # [n, C, h, w]
            except ValueError as error:
                raise ValueError(f"batch item {b}: {error}") from error
            # [t, D], grouped by object
            by_object = readout.mixed[b].index_select(0, grounded_hidden[order].to(device))
            text_embeds = self.text_proj(by_object)  # [t, D_proj]
            features.append(
                GroundingFeatures(
                    attention_maps=maps,
                    text_embeddings=list(text_embeds.split(counts)),  # per object [t_k, D_proj]
                    padded_hw=batch.padded_hw[b],
                    content_box=batch.content_box[b],
                    selector_logits=None if selector is None else selector[b],
                )
            )
        return features

    def _merge_tokens(self, attn: torch.Tensor, order: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Per-object mean or max of the phrase-token maps ``attn`` ``[L, H, t, N]`` -> ``[n, L, H, N]``.

        One gather of every object's tokens, padded to the longest object, then one masked reduction.
        """
        num_objects, longest = len(counts), max(counts)
        index = torch.zeros(num_objects, longest, dtype=torch.long)  # [n, t_max] into the t axis
        valid = torch.zeros(num_objects, longest, dtype=torch.bool)  # [n, t_max]
        start = 0
        for k, count in enumerate(counts):
            index[k, :count] = order[start : start + count]
            valid[k, :count] = True
            start += count
        index, valid = index.to(attn.device), valid.to(attn.device)
        tokens = attn[:, :, index].permute(2, 0, 1, 3, 4)  # [n, L, H, t_max, N]
        valid = valid[:, None, None, :, None]  # [n, 1, 1, t_max, 1]
        if self.merge == "mean":
            sizes = torch.tensor(counts, dtype=attn.dtype, device=attn.device)[:, None, None, None]
            return torch.where(valid, tokens, 0.0).sum(dim=3) / sizes
        return tokens.masked_fill(~valid, float("-inf")).amax(dim=3)
