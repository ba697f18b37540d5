"""The family-independent half of every adapter over a transformers image-text model: loading and freezing
the model, the batched forward with attention capture, the layer-weighted hidden states and the per-object
read-out (``readout``). The prompt side is ``prompting.ChatPromptBuilder``. A family file says only what
differs: how an image becomes pixel inputs, and how image-token columns lay out on a grid.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoModelForImageTextToText, PretrainedConfig

from flmm_lightning.boundaries import FrozenFeatures, GroundingFeatures, LMMBatch
from flmm_lightning.common.feature_store import module_digest
from flmm_lightning.lmm.base import FrozenLMM
from flmm_lightning.lmm.capture import build_capture
from flmm_lightning.lmm.keyword_selector import KeywordSelector
from flmm_lightning.lmm.readout import (
    MERGE_MODES,
    FrozenReadout,
    TokenReadout,
    merge_object_tokens,
    padded_positions,
    tokens_by_object,
)

# The longest answer ``HFGroundingAdapter.generate`` writes unless told otherwise.
DEFAULT_MAX_NEW_TOKENS = 256

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(torch_dtype: str) -> torch.dtype:
    if torch_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if torch_dtype not in TORCH_DTYPES:
        raise ValueError(f"torch_dtype must be 'auto', 'float32' or 'bfloat16', got {torch_dtype!r}")
    return TORCH_DTYPES[torch_dtype]


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
        self._feature_identity: str | None = None

    @property
    def attention_channels(self) -> int:
        return self.num_layers * self.num_heads

    def set_capture(self, capture: str) -> None:
        """Switches the attention capture (``"eager"`` | ``"fused"``) and the model's attention implementation
        with it; the weights stay as they are."""
        self.capture = build_capture(capture)
        self._feature_identity = None
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
        return self.trainable_features(self.frozen_features(batch))

    def feature_identity(self) -> str:
        """Hash of everything besides the inputs that determines ``frozen_features``: this adapter's class,
        merge, capture and hidden-state rows, the model's config, dtype and weights, and the library versions
        (computed once: it reads every weight)."""
        if self._feature_identity is None:
            settings = (
                f"{type(self).__qualname__}|merge={self.merge}|capture={self.capture.name}"
                f"|selector_rows={self.keyword_selector is not None}|dtype={self.model.dtype}"
                f"|transformers={transformers.__version__}|torch={torch.__version__}"
                f"|{self.model.config.to_json_string(use_diff=False)}"
            )
            self._feature_identity = module_digest(self.model, settings)
        return self._feature_identity

    def read(self, batch: LMMBatch, every_utterance_token: bool = False) -> TokenReadout:
        """One forward of the frozen LMM over ``batch`` (``read_frozen``), its hidden states mixed by the
        trainable layer weights."""
        frozen = self.read_frozen(batch, every_utterance_token)
        return TokenReadout(
            attention=frozen.attention,
            attention_positions=frozen.attention_positions,
            attention_counts=frozen.attention_counts,
            image_token_counts=frozen.image_token_counts,
            mixed=self.mix_layers(frozen.hidden),
            hidden_positions=frozen.hidden_positions,
            hidden_counts=frozen.hidden_counts,
        )

    def read_frozen(self, batch: LMMBatch, every_utterance_token: bool = False) -> FrozenReadout:
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

        return FrozenReadout(
            attention=attn,
            attention_positions=query_positions_host,
            attention_counts=query_counts,
            image_token_counts=key_counts,
            hidden=hidden,
            hidden_positions=hidden_positions_host,
            hidden_counts=hidden_counts,
        )

    def mix_layers(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[L, B, T, D]`` per-layer hidden states -> ``[B, T, D]``, weighted by
        ``softmax(text_layer_weights)``; gradients flow into the layer weights, and what reads the result,
        from here on."""
        layer_weights = torch.softmax(self.text_layer_weights, dim=0)  # [L]
        weighted = hidden.to(layer_weights.dtype) * layer_weights[:, None, None, None]  # [L, B, T, D]
        return weighted.sum(dim=0)  # [B, T, D]

    def selector_logits(self, readout: TokenReadout) -> list[torch.Tensor]:
        """The keyword selector's logit of every utterance token of each sample (``[u_b]``, in order)."""
        if self.keyword_selector is None:
            raise ValueError("this adapter has no keyword selector (model.lmm.keyword_selector=false)")
        logits = self.keyword_selector(readout.mixed)  # [B, T_h]
        return [logits[b, : int(count)] for b, count in enumerate(readout.hidden_counts)]

    def frozen_features(self, batch: LMMBatch) -> list[FrozenFeatures]:
        """Per sample, what the frozen LMM says about the objects that ``batch.mask_ids`` marks, before
        anything trainable reads it: merged attention maps and the per-layer hidden states of the
        hidden-state rows (``read_frozen``). What a feature cache keeps (``feature_store``)."""
        readout = self.read_frozen(batch)
        mask_ids_host = batch.mask_ids.cpu()  # [B, S]
        frozen = []
        for b in range(mask_ids_host.shape[0]):
            maps, hidden_objects = self._object_maps(batch, readout, mask_ids_host, b)
            frozen.append(
                FrozenFeatures(
                    attention_maps=maps,
                    hidden_states=readout.hidden[:, b, : len(hidden_objects)],  # [L, u_b, D]
                    hidden_objects=hidden_objects,
                    padded_hw=batch.padded_hw[b],
                    content_box=batch.content_box[b],
                )
            )
        return frozen

    def trainable_features(self, frozen: list[FrozenFeatures]) -> list[GroundingFeatures]:
        """The trainable read-out of ``frozen_features`` (computed now or served by a feature cache): hidden
        states mixed by the layer weights, projected per object and, with a keyword selector, scored."""
        device = self.text_layer_weights.device
        counts = [len(f.hidden_objects) for f in frozen]
        layers, hidden_size = frozen[0].hidden_states.shape[0], frozen[0].hidden_states.shape[-1]
        # The padded batch ``read_frozen`` holds, whatever the features' source: mixing and the selector then
        # see the same shapes live and cached, and give the same bits.
        hidden = torch.zeros(
            layers, len(frozen), max(counts), hidden_size, dtype=frozen[0].hidden_states.dtype, device=device
        )  # [L, B, T_h, D]
        for b, item in enumerate(frozen):
            hidden[:, b, : counts[b]] = item.hidden_states
        mixed = self.mix_layers(hidden)  # [B, T_h, D]
        selector = self.keyword_selector(mixed) if self.keyword_selector is not None else None  # [B, T_h]
        return [
            self._grounding_features(
                item.attention_maps.to(device),
                mixed[b],
                item.hidden_objects,
                item.padded_hw,
                item.content_box,
                None if selector is None else selector[b, : counts[b]],
                b,
            )
            for b, item in enumerate(frozen)
        ]

    def features(self, batch: LMMBatch, readout: TokenReadout) -> list[GroundingFeatures]:
        """Per sample, the objects that ``batch.mask_ids`` marks, from ``readout`` (``read`` of this batch;
        its rows must include every grounded token): merged attention maps, projected hidden states of
        their tokens and, with a keyword selector, the logit of every utterance token."""
        mask_ids_host = batch.mask_ids.cpu()  # [B, S]
        selector = self.selector_logits(readout) if self.keyword_selector is not None else None
        features = []
        for b in range(mask_ids_host.shape[0]):
            maps, hidden_objects = self._object_maps(batch, readout, mask_ids_host, b)
            features.append(
                self._grounding_features(
                    maps,
                    readout.mixed[b],
                    hidden_objects,
                    batch.padded_hw[b],
                    batch.content_box[b],
                    None if selector is None else selector[b],
                    b,
                )
            )
        return features

    def _object_maps(
        self, batch: LMMBatch, readout: FrozenReadout | TokenReadout, mask_ids_host: torch.Tensor, b: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch item ``b``'s merged attention maps ``[n, C, h, w]`` and the object index of each of its
        hidden-state rows (long ``[u_b]``, -1 for none)."""
        t_b, n_b = int(readout.attention_counts[b]), int(readout.image_token_counts[b])
        row_objects = mask_ids_host[b, readout.attention_positions[b, :t_b]]  # [t_b]
        grounded_rows = (row_objects >= 0).nonzero()[:, 0]  # [t] attention rows of grounded tokens
        hidden_objects = mask_ids_host[b, readout.hidden_positions[b, : int(readout.hidden_counts[b])]]
        if grounded_rows.numel() != int((mask_ids_host[b] >= 0).sum()):
            raise ValueError(f"batch item {b}: the readout holds no attention for some grounded tokens")
        order, counts = tokens_by_object(row_objects[grounded_rows], b)
        sample_attn = readout.attention[b, :, :, :t_b, :n_b].float()  # [L, H, t_b, N]
        # [n, L, H, N]: each object's token maps merged
        merged = merge_object_tokens(sample_attn, grounded_rows[order], counts, self.merge)
        try:
            maps = self.image_maps(merged, batch.grid_hw[b])  # [n, C, h, w]
        except ValueError as error:
            raise ValueError(f"batch item {b}: {error}") from error
        return maps, hidden_objects

    def _grounding_features(
        self,
        maps: torch.Tensor,
        mixed: torch.Tensor,
        hidden_objects: torch.Tensor,
        padded_hw: tuple[int, int],
        content_box: tuple[int, int, int, int],
        selector_logits: torch.Tensor | None,
        item: int,
    ) -> GroundingFeatures:
        """One sample's features from its maps ``[n, C, h, w]``, its layer-mixed hidden states ``[>= u, D]``
        and the object of each hidden-state row ``[u]``."""
        grounded = (hidden_objects >= 0).nonzero()[:, 0]  # [t] hidden rows of grounded tokens
        order, counts = tokens_by_object(hidden_objects[grounded], item)
        by_object = mixed.index_select(0, grounded[order].to(mixed.device))  # [t, D], grouped by object
        text_embeds = self.text_proj(by_object)  # [t, D_proj]
        return GroundingFeatures(
            attention_maps=maps,
            text_embeddings=list(text_embeds.split(counts)),  # per object [t_k, D_proj]
            padded_hw=padded_hw,
            content_box=content_box,
            selector_logits=selector_logits,
        )
