"""Qwen2-VL / Qwen2.5-VL: prompt building (dataloader side) and the frozen-model adapter (module side)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from flmm_lightning.data.sample import GroundingSample
from flmm_lightning.lmm.base import FrozenLMM, GroundingFeatures, LMMBatch, PromptBuilder, PromptInputs
from flmm_lightning.lmm.capture import build_capture

DEFAULT_INSTRUCTION = "Please give me a description of the image."


class Qwen2VLPromptBuilder(PromptBuilder):
    """Chat prompt (system, user: image + instruction, generation prompt), then each utterance's own tokens.

    The processor is loaded lazily and not pickled, so the builder travels cheaply to dataloader workers.
    """

    def __init__(
        self,
        pretrained: str | os.PathLike,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
    ) -> None:
        self.pretrained = str(pretrained)
        self.max_pixels = max_pixels
        self.min_pixels = min_pixels
        self.instruction = instruction
        self._processor: Any = None
        self._prompt: str | None = None
        self._size: dict[str, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_processor=None, _prompt=None, _size=None)
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
        self._processor = processor

    @property
    def processor(self) -> Any:
        if self._processor is None:
            self._load()
        return self._processor

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
        processor = self.processor
        encoded = processor(images=[sample.image], text=[self._prompt], size=self._size, return_tensors="pt")
        prompt_ids = encoded["input_ids"][0]  # [S_p], image placeholder already expanded
        utterance_ids, utterance_mask_ids = self._utterance_ids(sample)
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

    def __init__(
        self,
        pretrained: str | os.PathLike,
        text_proj_dim: int,
        capture: str = "fused",
        merge: str = "mean",
        torch_dtype: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if merge not in ("mean", "max"):
            raise ValueError(f"merge must be 'mean' or 'max', got {merge!r}")
        self.merge = merge
        self.capture = build_capture(capture)
        self.model = AutoModelForImageTextToText.from_pretrained(
            str(pretrained),
            dtype=_resolve_dtype(torch_dtype),
            attn_implementation=self.capture.attn_implementation,
            trust_remote_code=trust_remote_code,
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

    def train(self, mode: bool = True) -> Qwen2VLAdapter:
        super().train(mode)
        # Frozen means frozen: no dropout or other train-time behaviour in the LMM, whatever the trainer asks.
        self.model.eval()
        return self

    def _merge_tokens(self, maps: torch.Tensor) -> torch.Tensor:
        """[L, H, t, h, w] -> [L, H, h, w] over the object's tokens."""
        return maps.mean(dim=2) if self.merge == "mean" else maps.amax(dim=2)

    def forward(self, batch: LMMBatch) -> list[GroundingFeatures]:
        device = self.text_layer_weights.device
        input_ids = batch.input_ids.to(device)  # [B, S]
        attention_mask = batch.attention_mask.to(device)  # [B, S]
        mask_ids = batch.mask_ids.to(device)  # [B, S]
        image_tokens = input_ids == self.image_token_id  # [B, S]
        query_positions, query_counts = _padded_positions(mask_ids >= 0)  # [B, T], [B]
        key_positions, key_counts = _padded_positions(image_tokens)  # [B, N], [B]

        inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
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
            # Image tokens are row-major over the merged grid (the vision tower undoes its window order).
            sample_attn = (
                attn[b, :, :, :t_b, :n_b].float().reshape(self.num_layers, self.num_heads, t_b, h, w)
            )
            token_objects = mask_ids[b, query_positions[b, :t_b]]  # [t_b]
            num_objects = int(token_objects.max()) + 1
            object_maps, object_embeds = [], []
            for k in range(num_objects):
                selected = token_objects == k  # [t_b]
                if not bool(selected.any()):
                    raise ValueError(f"batch item {b}: object {k} owns no tokens")
                merged = self._merge_tokens(sample_attn[:, :, selected])  # [L, H, h, w]
                object_maps.append(merged.flatten(0, 1))  # [L*H, h, w], layer-major
                object_embeds.append(text_embeds[b, :t_b][selected])  # [t_k, D_proj]
            features.append(
                GroundingFeatures(
                    attention_maps=torch.stack(object_maps),  # [n, L*H, h, w]
                    text_embeddings=object_embeds,
                    padded_hw=batch.padded_hw[b],
                    content_box=batch.content_box[b],
                )
            )
        return features
