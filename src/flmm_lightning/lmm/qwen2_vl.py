"""Qwen2-VL / Qwen2.5-VL: prompt building (dataloader side) and the frozen-model adapter (module side)."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, PretrainedConfig
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from flmm_lightning.data.sample import NOT_GROUNDED, GroundingSample
from flmm_lightning.lmm.base import (
    ContextOverflowError,
    FrozenLMM,
    GroundingFeatures,
    LMMBatch,
    PromptBuilder,
    PromptInputs,
)
from flmm_lightning.lmm.capture import build_capture

DEFAULT_INSTRUCTION = "Please give me a description of the image."


class Qwen2VLPromptBuilder(PromptBuilder):
    """Chat prompt (system, user: image + instruction, generation prompt), then each utterance's own tokens.

    The processor is loaded lazily and not pickled, so the builder travels cheaply to dataloader workers.

    Limits, so that an oversized input never reaches the model:

    - pixels: the processor downscales an image above ``max_pixels`` (aspect ratio kept, sides a multiple of
      28) and upscales one below ``min_pixels``; the builder warns once when it downscales. An image more than
      200 times wider than tall (or the reverse) is refused with the sample named.
    - tokens: the sequence (prompt, image tokens, utterances) must fit ``max_length``, by default the LMM's
      ``max_position_embeddings``. ``__call__`` refuses a sample that does not fit (``ContextOverflowError``);
      ``fit_to_context`` (training) first drops the trailing objects that do not fit.
    """

    def __init__(
        self,
        pretrained: str | os.PathLike,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        max_length: int | None = None,
    ) -> None:
        self.pretrained = str(pretrained)
        self.max_pixels = max_pixels
        self.min_pixels = min_pixels
        self.instruction = instruction
        self.max_length = max_length
        self._processor: Any = None
        self._prompt: str | None = None
        self._size: dict[str, int] | None = None
        self._context: int | None = None
        self._template_tokens: int | None = None
        self._warned_downscale = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_processor=None, _prompt=None, _size=None, _context=None, _template_tokens=None)
        return state

    def _load(self) -> None:
        processor = AutoProcessor.from_pretrained(self.pretrained, trust_remote_code=False)
        default_size = processor.image_processor.size
        # Passed per call: the image processor's min/max_pixels constructor arguments are deprecated.
        self._size = {
            "shortest_edge": self.min_pixels if self.min_pixels is not None else default_size.shortest_edge,
            "longest_edge": self.max_pixels if self.max_pixels is not None else default_size.longest_edge,
        }
        content = [{"type": "image"}, {"type": "text", "text": self.instruction}]
        messages = [{"role": "user", "content": content}]
        self._prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The prompt's one image placeholder becomes as many tokens as the image has merged patches.
        self._template_tokens = len(processor.tokenizer.encode(self._prompt, add_special_tokens=False)) - 1
        config = AutoConfig.from_pretrained(self.pretrained, trust_remote_code=False)
        # Qwen's rotary positions do not stop at max_position_embeddings (nothing fails beyond it, the model
        # just was never trained there), so the limit is enforced here.
        self._context = self.max_length or getattr(config, "text_config", config).max_position_embeddings
        self._processor = processor

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

    def _resized_hw(self, sample: GroundingSample) -> tuple[int, int]:
        """The processor's size for this image (its ``smart_resize``), with the sample named on refusal."""
        image_processor = self.processor.image_processor
        try:
            return smart_resize(
                sample.image.height,
                sample.image.width,
                factor=image_processor.patch_size * image_processor.merge_size,
                min_pixels=self._size["shortest_edge"],
                max_pixels=self._size["longest_edge"],
            )
        except ValueError as error:
            raise ValueError(f"sample {sample.image_id} ({sample.file_name}): {error}") from error

    def _prompt_tokens(self, sample: GroundingSample) -> int:
        height, width = self._resized_hw(sample)
        factor = self.processor.image_processor.patch_size * self.processor.image_processor.merge_size
        return self._template_tokens + (height // factor) * (width // factor)

    def fit_to_context(self, sample: GroundingSample) -> GroundingSample:
        """``sample`` itself when it fits the context; else a copy without the trailing objects that do not.

        Rule: the utterances are cut after the last utterance of the last object whose utterances all fit;
        objects from there on are dropped with their masks (``num_dropped_objects`` counts them), and a
        warning names the sample. Attention is causal, so the kept objects' maps are exactly those of the
        full sequence. An utterance of a dropped object that lies before the cut stays as plain context.
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
                "lower model.prompt.max_pixels"
            )
        cut = max(last_utterance[k] for k in range(kept)) + 1
        dropped = sample.num_objects - kept
        warnings.warn(
            f"sample {sample.image_id} ({sample.file_name}): {prompt_tokens + sum(counts)} tokens exceed the "
            f"LMM's context of {self.context_length}; its last {dropped} of {sample.num_objects} objects are "
            "dropped",
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

    def _warn_if_downscaled(self, sample: GroundingSample) -> None:
        """Once per builder (per dataloader worker): COCO-sized images stay under the default cap."""
        pixels = sample.image.width * sample.image.height
        if self._warned_downscale or pixels <= self._size["longest_edge"]:
            return
        self._warned_downscale = True
        height, width = self._resized_hw(sample)
        warnings.warn(
            f"sample {sample.image_id} ({sample.file_name}): {sample.image.width}x{sample.image.height} "
            f"pixels exceed model.prompt.max_pixels={self._size['longest_edge']}; the LMM sees it downscaled "
            f"to {width}x{height} (masks stay at full size; warned once, other large images are downscaled "
            "the same way)",
            stacklevel=2,
        )

    def __call__(self, sample: GroundingSample) -> PromptInputs:
        processor = self.processor
        self._warn_if_downscaled(sample)
        utterance_ids, utterance_mask_ids = self._utterance_ids(sample)
        # Also refuses, with the sample named, an aspect ratio the processor would reject deep inside.
        total = self._prompt_tokens(sample) + len(utterance_ids)
        if total > self.context_length:
            raise ContextOverflowError(
                f"sample {sample.image_id} ({sample.file_name}): {total} tokens exceed the LMM's context of "
                f"{self.context_length}. Training drops trailing objects to fit; evaluation and prediction "
                "refuse, since leaving objects out would change the metric: give fewer phrases per sample "
                "(RefCOCO: group_by_image=false) or lower model.prompt.max_pixels"
            )
        encoded = processor(images=[sample.image], text=[self._prompt], size=self._size, return_tensors="pt")
        prompt_ids = encoded["input_ids"][0]  # [S_p], image placeholder already expanded
        input_ids = torch.cat([prompt_ids, torch.tensor(utterance_ids, dtype=torch.long)])  # [S]
        mask_ids = torch.cat(
            [torch.full_like(prompt_ids, -1), torch.tensor(utterance_mask_ids, dtype=torch.long)]
        )  # [S]

        image_grid_thw = encoded["image_grid_thw"]  # [1, 3]
        _, grid_h, grid_w = (int(v) for v in image_grid_thw[0])
        merge = processor.image_processor.merge_size
        patch = processor.image_processor.patch_size
        height, width = grid_h * patch, grid_w * patch
        return PromptInputs(
            input_ids=input_ids,
            mask_ids=mask_ids,
            pixel_inputs={"pixel_values": encoded["pixel_values"], "image_grid_thw": image_grid_thw},
            grid_hw=(grid_h // merge, grid_w // merge),
            # Qwen resizes to a multiple of patch*merge and never pads: the grid covers exactly the image.
            padded_hw=(height, width),
            content_box=(0, 0, height, width),
        )

    def collate(self, prompts: list[PromptInputs]) -> LMMBatch:
        pad_id = self.processor.tokenizer.pad_token_id
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
            pixel_inputs={
                "pixel_values": torch.cat([p.pixel_inputs["pixel_values"] for p in prompts], dim=0),
                "image_grid_thw": torch.cat([p.pixel_inputs["image_grid_thw"] for p in prompts], dim=0),
            },
            grid_hw=[p.grid_hw for p in prompts],
            padded_hw=[p.padded_hw for p in prompts],
            content_box=[p.content_box for p in prompts],
        )


def _resolve_dtype(torch_dtype: str) -> torch.dtype:
    if torch_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if torch_dtype not in dtypes:
        raise ValueError(f"torch_dtype must be 'auto', 'float32' or 'bfloat16', got {torch_dtype!r}")
    return dtypes[torch_dtype]


def _padded_positions(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of each row, in order, right-padded with 0: ([B, K] long, counts [B])."""
    counts = selected.sum(dim=1)  # [B]
    width = int(counts.max())
    # A stable sort on "not selected" brings the selected positions to the front in sequence order.
    order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :width]  # [B, K]
    valid = torch.arange(width, device=selected.device)[None, :] < counts[:, None]  # [B, K]
    return torch.where(valid, order, torch.zeros_like(order)), counts


class Qwen2VLAdapter(FrozenLMM):
    """A frozen Qwen2-VL / Qwen2.5-VL read out as phrase-token attention maps and projected hidden states."""

    # ``config.model_type`` values this adapter reads; a subclass for a related family names its own.
    model_types: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl")

    def __init__(
        self,
        pretrained: str | os.PathLike | PretrainedConfig,
        text_proj_dim: int,
        capture: str = "fused",
        merge: str = "mean",
        torch_dtype: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        """``pretrained``: a hub id or a local directory; or a config, for a randomly initialised model of
        that architecture (benchmarks: created on the current default device, ``with torch.device(...)``)."""
        super().__init__()
        if merge not in ("mean", "max"):
            raise ValueError(f"merge must be 'mean' or 'max', got {merge!r}")
        self.merge = merge
        self.capture = build_capture(capture)
        if isinstance(pretrained, PretrainedConfig):
            self.model = AutoModelForImageTextToText.from_config(
                pretrained,
                dtype=_resolve_dtype(torch_dtype),
                attn_implementation=self.capture.attn_implementation,
                trust_remote_code=trust_remote_code,
            )
        else:
            self.model = AutoModelForImageTextToText.from_pretrained(
                str(pretrained),
                dtype=_resolve_dtype(torch_dtype),
                attn_implementation=self.capture.attn_implementation,
                trust_remote_code=trust_remote_code,
            )
        if self.model.config.model_type not in self.model_types:
            raise ValueError(
                f"{pretrained}: expected a checkpoint of model type {' or '.join(self.model_types)}, "
                f"found {self.model.config.model_type}"
            )
        self.model.requires_grad_(False)
        self.model.eval()

        text_config = self.model.config.text_config
        self.num_layers: int = text_config.num_hidden_layers
        self.num_heads: int = text_config.num_attention_heads
        self.image_token_id: int = self.model.config.image_token_id
        self.text_layer_weights = nn.Parameter(torch.ones(self.num_layers))
        self.text_proj = nn.Linear(text_config.hidden_size, text_proj_dim)

    @property
    def attention_channels(self) -> int:
        return self.num_layers * self.num_heads

    def set_capture(self, capture: str) -> None:
        """Switches the attention capture (``"eager"`` | ``"fused"``) and the model's attention implementation
        with it; the weights stay as they are."""
        self.capture = build_capture(capture)
        self.model.set_attn_implementation(self.capture.attn_implementation)

    def train(self, mode: bool = True) -> Qwen2VLAdapter:
        super().train(mode)
        # Frozen means frozen: no dropout or other train-time behaviour in the LMM, whatever the trainer asks.
        self.model.eval()
        return self

    def forward(self, batch: LMMBatch) -> list[GroundingFeatures]:
        device = self.text_layer_weights.device
        # Every position and count is worked out from host copies of the ids (one copy now if the batch is on
        # the device already), so the loop below never waits for the device.
        input_ids_host = batch.input_ids.cpu()  # [B, S]
        mask_ids_host = batch.mask_ids.cpu()  # [B, S]
        image_tokens_host = input_ids_host == self.image_token_id  # [B, S]
        query_positions_host, query_counts = _padded_positions(mask_ids_host >= 0)  # [B, T], [B]
        key_positions_host, key_counts = _padded_positions(image_tokens_host)  # [B, N], [B]
        query_positions = query_positions_host.to(device)
        key_positions = key_positions_host.to(device)
        image_tokens = image_tokens_host.to(device)

        inputs = dict(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            pixel_values=batch.pixel_inputs["pixel_values"].to(device=device, dtype=self.model.dtype),
            image_grid_thw=batch.pixel_inputs["image_grid_thw"].to(device),
            # Text 0 / image 1, as the processor returns it: M-RoPE needs it to lay image tokens on a 2D grid.
            mm_token_type_ids=image_tokens.long(),
            output_hidden_states=True,
            use_cache=False,
            # Only hidden states are read; skip the [B, S, vocab] logits.
            logits_to_keep=1,
        )
        with torch.no_grad():
            outputs, attn = self.capture.run(self.model, inputs, query_positions, key_positions)
            # attn: [B, L, H, T, N]
            last_layers = outputs.hidden_states[-self.num_layers :]  # L x [B, S, D]
            batch_size, t, d = query_positions.shape[0], query_positions.shape[1], last_layers[0].shape[-1]
            rows = query_positions[:, :, None].expand(batch_size, t, d)  # [B, T, D]
            # Gather before stacking: a stack of the full [L, B, S, D] would be a second copy of every layer.
            hidden = torch.stack([layer.gather(1, rows) for layer in last_layers])  # [L, B, T, D]
            del outputs, last_layers

        # Gradients flow into the layer weights and the projection from here on.
        layer_weights = torch.softmax(self.text_layer_weights, dim=0)  # [L]
        mixed = (hidden.to(layer_weights.dtype) * layer_weights[:, None, None, None]).sum(dim=0)  # [B, T, D]
        text_embeds = self.text_proj(mixed)  # [B, T, D_proj]

        features = []
        for b in range(batch_size):
            t_b, n_b = int(query_counts[b]), int(key_counts[b])
            h, w = batch.grid_hw[b]
            if h * w != n_b:
                raise ValueError(f"batch item {b}: {n_b} image tokens for a {h}x{w} grid")
            token_objects = mask_ids_host[b, query_positions_host[b, :t_b]]  # [t_b]
            order, counts = _tokens_by_object(token_objects, b)
            # Image tokens are row-major over the merged grid (the vision tower undoes its window order).
            sample_attn = attn[b, :, :, :t_b, :n_b].float()  # [L, H, t_b, N]
            maps = self._merge_tokens(sample_attn, order, counts)  # [n, L, H, N]
            grouped_embeds = text_embeds[b].index_select(0, order.to(device))  # [t_b, D_proj], by object
            features.append(
                GroundingFeatures(
                    attention_maps=maps.reshape(len(counts), -1, h, w),  # [n, L*H, h, w], layer-major
                    text_embeddings=list(grouped_embeds.split(counts)),  # per object [t_k, D_proj]
                    padded_hw=batch.padded_hw[b],
                    content_box=batch.content_box[b],
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


def _tokens_by_object(token_objects: torch.Tensor, item: int) -> tuple[torch.Tensor, list[int]]:
    """Host-side grouping of a sample's phrase tokens by the object they describe.

    token_objects: long ``[t]`` (CPU), object index per phrase token. Returns the token positions ordered by
    object, in sequence order within an object (``[t]``), and every object's token count.
    """
    counts = torch.bincount(token_objects, minlength=int(token_objects.max()) + 1).tolist()
    empty = [k for k, count in enumerate(counts) if count == 0]
    if empty:
        raise ValueError(f"batch item {item}: objects {empty} own no tokens")
    return torch.argsort(token_objects, stable=True), counts
