"""``python -m flmm_lightning.bench``: training-step throughput of the reference path against the fast path.

Paths, on identical inputs:

- ``reference``: how the F-LMM reference trains. Eager attention with ``output_attentions=True`` (every
  layer's full ``S x S`` probabilities), one sample per LMM forward and per SAM encoder call, the gradient
  accumulated over the batch's samples (each loss weighted by its share of the batch's objects, so that the
  gradient is the fast path's), then one optimizer step.
- ``fast``: one batched LMM forward with the ``fused`` capture (SDPA; only the phrase rows' probabilities
  recomputed; the vision tower's windows in one packed SDPA call per block), the SAM encoder batched with its
  attention fused (``SdpaRelPosAttention``), the same losses, one backward, the same optimizer step.
- ``fast_cached``: ``fast`` with a warm SAM embedding cache (``SamEmbeddingCache``).

A step is forward, losses, backward, gradient clipping (1.0) and AdamW, under bf16 autocast on a GPU
(Lightning's ``bf16-mixed``) and in fp32 on the CPU. The processor (tokenizer, image processor, SAM resize)
runs in dataloader workers during training, so it is timed on its own ("processor", per batch) and left out
of the step time; batches reach the device through the module's own ``transfer_batch_to_device``.

Each path runs ``--warmup`` untimed steps and one step for its peak memory; then ``--steps`` timed rounds
(samples/s) and ``--steps`` rounds with the device synchronised at every stage boundary (``stages``, ms per
step; "other" is the rest of the step: Python glue, cropping, token bookkeeping). A round is one step of
each path in turn, so that a change in the machine's load affects all paths alike.

Sizes: ``tiny`` (the offline test assets) and ``qwen2_5_vl_3b`` (the real Qwen2.5-VL-3B and SAM ViT-L
architectures, random weights, bf16 LMM, built on the GPU: same FLOPs and memory as the released models,
nothing downloaded; only the tiny asset's tokenizer and chat template are read).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image, ImageDraw
from torch import nn
from transformers import Qwen2_5_VLConfig

from flmm_lightning.assets import (
    QWEN2_5_VL_VOCAB_SIZE,
    TINY_MAX_PIXELS,
    TINY_MIN_PIXELS,
    ensure_tiny_qwen2_5_vl,
    ensure_tiny_sam,
)
from flmm_lightning.data.batch import EncodedDataset, GroundingBatch, GroundingCollate
from flmm_lightning.data.sample import GroundingSample
from flmm_lightning.heads.sam_cache import SamEmbeddingCache
from flmm_lightning.heads.sam_refiner import SamRefiner, build_sam
from flmm_lightning.heads.unet import UNetMaskHead
from flmm_lightning.lmm.qwen2_vl import Qwen2VLAdapter, Qwen2VLPromptBuilder
from flmm_lightning.model import FLMMModule

SIZES = ("tiny", "qwen2_5_vl_3b")
PATHS = ("reference", "fast", "fast_cached")
STAGES = (
    "processor",
    "lmm",
    "attention_capture",
    "unet",
    "sam_encoder",
    "sam_decoder",
    "losses",
    "backward",
    "optimizer",
    "other",
)
# The paper recipe (DESIGN.md "Optimisation").
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01
GRAD_CLIP_NORM = 1.0
# Processor pixel caps: conf/model/tiny_qwen2_5_vl.yaml and conf/model/qwen2_5_vl_3b.yaml (a 640x480 image
# keeps its size: 644x476 after rounding to 28 px, a 23x17 grid, 391 image tokens).
QWEN_3B_MAX_PIXELS = 1003520
QWEN_MIN_PIXELS = 3136
MIB = 2**20

# Synthetic scenes: 2-3 named shapes per image, all of them in one sequence (RefCOCO "concat" mode).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 210, 35),
    "purple": (135, 50, 175),
}
SHAPES = ("square", "circle")


# ----------------------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------------------


def qwen2_5_vl_3b_config() -> Qwen2_5_VLConfig:
    """Qwen/Qwen2.5-VL-3B-Instruct's architecture (its config.json): 36 layers, hidden 2048, 16 heads on 2 kv
    heads, MLP 11008; vision tower 32 blocks of width 1280 (4 with full attention), merged into 2048."""
    text_config = dict(
        vocab_size=QWEN2_5_VL_VOCAB_SIZE,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        max_window_layers=70,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        initializer_range=0.02,
        bos_token_id=151643,
        eos_token_id=151645,
    )
    vision_config = dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        hidden_act="silu",
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        out_hidden_size=2048,
        tokens_per_second=2,
        initializer_range=0.02,
    )
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )


def build_bench_module(size: str, device: torch.device) -> tuple[FLMMModule, Qwen2VLPromptBuilder]:
    """The module (frozen LMM in ``fused`` capture, SAM refiner, U-Net) and the prompt builder of a size."""
    tiny_dir = ensure_tiny_qwen2_5_vl()
    if size == "tiny":
        sam = build_sam("tiny", str(ensure_tiny_sam()))
        lmm = Qwen2VLAdapter(tiny_dir, sam.prompt_encoder.embed_dim, capture="fused", torch_dtype="float32")
        prompt_builder = Qwen2VLPromptBuilder(
            tiny_dir, max_pixels=TINY_MAX_PIXELS, min_pixels=TINY_MIN_PIXELS
        )
    elif size == "qwen2_5_vl_3b":
        # Created on the device directly: a random 3.8B-parameter init on the CPU would take minutes.
        with torch.device(device):
            sam = build_sam("vit_l", None)
            lmm = Qwen2VLAdapter(
                qwen2_5_vl_3b_config(), sam.prompt_encoder.embed_dim, capture="fused", torch_dtype="bfloat16"
            )
        prompt_builder = Qwen2VLPromptBuilder(
            tiny_dir, max_pixels=QWEN_3B_MAX_PIXELS, min_pixels=QWEN_MIN_PIXELS
        )
    else:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    optimizer = partial(torch.optim.AdamW, lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY)
    module = FLMMModule(lmm, SamRefiner(sam), mask_head=UNetMaskHead, optimizer=optimizer)
    return module.to(device).train(), prompt_builder


def synthetic_samples(count: int, width: int, height: int, seed: int) -> list[GroundingSample]:
    """Noise images with 2-3 coloured squares/circles, one phrase per shape ("the red circle")."""
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        num_objects = int(rng.integers(2, 4))
        phrases, masks = [], []
        for colour in map(str, rng.choice(list(COLOURS), size=num_objects, replace=False)):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            w, h = int(rng.integers(width // 6, width // 2)), int(rng.integers(height // 6, height // 2))
            x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            box = (x0, y0, x0 + w - 1, y0 + h - 1)
            mask = Image.new("L", (width, height))
            for canvas, fill in ((draw, COLOURS[colour]), (ImageDraw.Draw(mask), 1)):
                (canvas.rectangle if shape == "square" else canvas.ellipse)(box, fill=fill)
            phrases.append(f"the {colour} {shape}")
            masks.append(np.asarray(mask, dtype=bool))
        samples.append(
            GroundingSample(
                image=image,
                phrases=phrases,
                masks=torch.from_numpy(np.stack(masks)),
                is_thing=torch.ones(num_objects, dtype=torch.bool),
                is_plural=torch.zeros(num_objects, dtype=torch.bool),
                image_id=index,
                file_name=f"bench_{index:04d}.png",
                object_ids=[f"{index}_{k}" for k in range(num_objects)],
            )
        )
    return samples


@dataclass
class BenchBatch:
    """One training batch as each path consumes it, already on the device."""

    batched: GroundingBatch  # the fast paths: all samples in one batch
    singles: list[GroundingBatch]  # the reference: one batch per sample
    processor_s: float  # encoding + collating the batch (dataloader-worker work)
    processor_singles_s: float


def prepare_batches(
    module: FLMMModule,
    prompt_builder: Qwen2VLPromptBuilder,
    samples: list[GroundingSample],
    batch_size: int,
    device: torch.device,
) -> list[BenchBatch]:
    dataset = EncodedDataset(samples, prompt_builder, module.sam.img_size)
    collate = GroundingCollate(prompt_builder)
    _ = prompt_builder.processor  # loaded now, so that its one-off cost is not timed
    batches = []
    for start in range(0, len(samples), batch_size):
        indices = range(start, start + batch_size)
        began = time.perf_counter()
        encoded = [dataset[i] for i in indices]
        batched = collate(encoded)
        encoded_s = time.perf_counter() - began
        began = time.perf_counter()
        singles = [collate([item]) for item in encoded]
        # The reference encodes the same samples and collates each on its own.
        singles_s = encoded_s + time.perf_counter() - began
        batches.append(
            BenchBatch(
                batched=module.transfer_batch_to_device(batched, device, 0),
                singles=[module.transfer_batch_to_device(single, device, 0) for single in singles],
                processor_s=encoded_s,
                processor_singles_s=singles_s,
            )
        )
    return batches


# ----------------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------------


class StageTimer:
    """Seconds per named stage, the device synchronised at each boundary so that they are the device's."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._started: dict[str, float] = {}

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self, name: str) -> None:
        self._started[name] = self.now()

    def stop(self, name: str) -> None:
        self.seconds[name] += self.now() - self._started.pop(name)

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    @contextlib.contextmanager
    def instrumented(self, module: FLMMModule) -> Iterator[None]:
        """Times the module's parts through forward hooks while the block runs.

        ``lmm_total`` is the adapter (model forward + reading the maps out), ``lmm`` the frozen model alone.
        ``encode_images`` is not a module call: it is shadowed on the instance for the duration.
        """
        handles = []
        timed = {
            "lmm_total": module.lmm,
            "lmm": module.lmm.model,
            "unet": module.mask_head,
            "sam_decoder": module.sam,
        }
        for name, part in timed.items():
            handles.append(part.register_forward_pre_hook(lambda _m, _a, name=name: self.start(name)))
            handles.append(part.register_forward_hook(lambda _m, _a, _o, name=name: self.stop(name)))
        encode_images = module.sam.encode_images

        def timed_encode_images(images: list[torch.Tensor]) -> torch.Tensor:
            with self.span("sam_encoder"):
                return encode_images(images)

        module.sam.encode_images = timed_encode_images
        try:
            yield
        finally:
            del module.sam.encode_images
            for handle in handles:
                handle.remove()


class NoTimer(StageTimer):
    """The throughput steps: no synchronisation, nothing recorded."""

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        yield


def _release_free_heap() -> None:
    """Hands free heap pages back to the OS (glibc), so that the next path's peak RSS starts from its own."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _proc_status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise KeyError(field_name)


class MemoryMeter:
    """Peak memory of a block: CUDA max allocated on a GPU; on the CPU the peak resident set size.

    The CPU peak resets through ``/proc/self/clear_refs`` (Linux); where that is refused the figure is the
    process's lifetime peak (``ru_maxrss``) and ``kind`` says so.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"
        self.base_mib = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mib = torch.cuda.memory_allocated(self.device) / MIB
            return
        _release_free_heap()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base_mib = _proc_status_kib("VmRSS") / 1024
        except OSError:
            self.kind = "cpu_lifetime_peak_rss"
            self.base_mib = 0.0

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / MIB
        if self.kind == "cpu_peak_rss":
            return _proc_status_kib("VmHWM") / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------------
# Training steps
# ----------------------------------------------------------------------------------------------------------


def _precision(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _optimizer_step(module: FLMMModule, optimizer: torch.optim.Optimizer, timer: StageTimer) -> None:
    with timer.span("optimizer"):
        parameters = [p for p in module.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(parameters, GRAD_CLIP_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def fast_step(
    module: FLMMModule, batch: BenchBatch, optimizer: torch.optim.Optimizer, timer: StageTimer
) -> None:
    with _precision(timer.device):
        predictions = module(batch.batched)
        with timer.span("losses"):
            loss = module._losses(batch.batched, predictions)["loss"]
    with timer.span("backward"):
        loss.backward()
    _optimizer_step(module, optimizer, timer)


def reference_step(
    module: FLMMModule, batch: BenchBatch, optimizer: torch.optim.Optimizer, timer: StageTimer
) -> None:
    total_objects = sum(single.samples[0].num_objects for single in batch.singles)
    for single in batch.singles:
        with _precision(timer.device):
            predictions = module(single)
            with timer.span("losses"):
                share = single.samples[0].num_objects / total_objects
                loss = module._losses(single, predictions)["loss"] * share
        with timer.span("backward"):
            loss.backward()
    _optimizer_step(module, optimizer, timer)


StepFn = Callable[[FLMMModule, BenchBatch, torch.optim.Optimizer, StageTimer], None]


@dataclass
class BenchPath:
    """How one path runs: its step function, the LMM's attention capture (with it, the vision tower's packed
    attention under ``fused``), the SAM encoder's attention and the SAM embedding cache it uses."""

    name: str
    step: StepFn
    capture: str
    sam_attention: str
    cache: SamEmbeddingCache | None = None

    def configure(self, module: FLMMModule) -> None:
        module.lmm.set_capture(self.capture)
        module.sam.set_encoder_attention(self.sam_attention)
        module.sam.embedding_cache = self.cache


@dataclass
class PathResult:
    samples_per_s: float
    step_ms: float
    peak_mem_mb: float
    peak_extra_mb: float  # over what was allocated (resident) just before the step
    memory_kind: str
    stages_ms: dict[str, float] = field(default_factory=dict)  # per step
    lmm_tflops: float | None = None
    cache: dict[str, int] | None = None


def run_paths(
    module: FLMMModule,
    paths: list[BenchPath],
    batches: list[BenchBatch],
    batch_size: int,
    warmup: int,
    steps: int,
    device: torch.device,
) -> dict[str, PathResult]:
    """Warm-up and one peak-memory step per path, then timed rounds, then instrumented rounds.

    A round runs one step of every path in turn: a change in the machine's load (a shared CPU, clocks) falls
    on all paths alike instead of on whichever ran at the time. The paths share the module and the optimizer:
    trainable weight values do not change the cost of a step.
    """
    optimizer = module.optimizer_factory(params=[p for p in module.parameters() if p.requires_grad])
    untimed = NoTimer(device)
    memory: dict[str, tuple[float, float, str]] = {}
    for path in paths:
        path.configure(module)
        for i in range(warmup):
            path.step(module, batches[i % len(batches)], optimizer, untimed)
        meter = MemoryMeter(device)
        meter.start()
        path.step(module, batches[0], optimizer, untimed)
        peak = meter.peak_mib()
        memory[path.name] = (peak, peak - meter.base_mib, meter.kind)
        if path.cache is not None:
            path.cache.stats.reset()

    elapsed: dict[str, float] = defaultdict(float)
    clock = StageTimer(device)
    for i in range(steps):
        for path in paths:
            path.configure(module)
            began = clock.now()
            path.step(module, batches[i % len(batches)], optimizer, untimed)
            elapsed[path.name] += clock.now() - began

    timers = {path.name: StageTimer(device) for path in paths}
    staged: dict[str, float] = defaultdict(float)
    for i in range(steps):
        for path in paths:
            path.configure(module)
            timer = timers[path.name]
            with timer.instrumented(module):
                began = timer.now()
                path.step(module, batches[i % len(batches)], optimizer, timer)
                staged[path.name] += timer.now() - began

    return {
        path.name: PathResult(
            samples_per_s=steps * batch_size / elapsed[path.name],
            step_ms=1e3 * elapsed[path.name] / steps,
            peak_mem_mb=memory[path.name][0],
            peak_extra_mb=memory[path.name][1],
            memory_kind=memory[path.name][2],
            stages_ms=_stage_breakdown(timers[path.name].seconds, staged[path.name], steps),
            cache=asdict(path.cache.stats) if path.cache is not None else None,
        )
        for path in paths
    }


def _stage_breakdown(seconds: dict[str, float], total: float, steps: int) -> dict[str, float]:
    """ms per step for each stage of ``STAGES`` except "processor" (added by the caller)."""
    stages = {
        "lmm": seconds["lmm"],
        "attention_capture": seconds["lmm_total"] - seconds["lmm"],
        "unet": seconds["unet"],
        "sam_encoder": seconds["sam_encoder"],
        "sam_decoder": seconds["sam_decoder"],
        "losses": seconds["losses"],
        "backward": seconds["backward"],
        "optimizer": seconds["optimizer"],
    }
    stages["other"] = max(0.0, total - sum(stages.values()))
    return {name: 1e3 * value / steps for name, value in stages.items()}


# ----------------------------------------------------------------------------------------------------------
# Attention agreement and FLOPs
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def attention_agreement(module: FLMMModule, batch: BenchBatch, device: torch.device) -> dict[str, float]:
    """Max abs difference between the reference's (eager, per sample) and the fast path's (fused, batched)
    attention maps and text embeddings of the same batch; the LMM is frozen, so training does not matter."""
    lmm = module.lmm
    with _precision(device):
        lmm.set_capture("eager")
        try:
            reference = [lmm(single.lmm)[0] for single in batch.singles]
        finally:
            lmm.set_capture("fused")
        fast = lmm(batch.batched.lmm)
    attention_diff = text_diff = attention_max = 0.0
    for ref, new in zip(reference, fast, strict=True):
        attention_diff = max(attention_diff, float((ref.attention_maps - new.attention_maps).abs().max()))
        attention_max = max(attention_max, float(ref.attention_maps.abs().max()))
        for ref_text, new_text in zip(ref.text_embeddings, new.text_embeddings, strict=True):
            text_diff = max(text_diff, float((ref_text.float() - new_text.float()).abs().max()))
    return {
        "attention_max_abs_diff": attention_diff,
        "attention_max": attention_max,
        "text_embedding_max_abs_diff": text_diff,
    }


def _num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lmm_forward_flops(model: nn.Module, seq_len: int, grid_thw: tuple[int, int, int]) -> float:
    """Forward FLOPs of one sample through a Qwen2.5-VL (a multiply-add counts 2).

    Vision tower, ``N = t*h*w`` patches of width ``D_v``: ``2*(P_patch_embed + P_blocks)*N + 2*P_merger*N/4``
    (the merger sees 2x2-merged tokens), plus attention ``4*N*K*D_v`` per block (QK^T and AV), ``K = N`` in
    the full-attention blocks and ``K = min(N, (window_size / patch_size)^2)`` in the windowed ones.
    Decoder, ``S`` tokens, ``L`` layers of ``H`` heads of size ``d``: ``2*P_layers*S`` plus attention
    ``2*H*d*S*(S+1)`` per layer (QK^T and AV over the causal half). Embedding lookups, norms, rotary
    embeddings, softmax and the one-token LM head are left out (well under 1 %).
    """
    vision, text = model.config.vision_config, model.config.text_config
    visual = model.model.visual
    layers = model.model.language_model.layers
    patches = grid_thw[0] * grid_thw[1] * grid_thw[2]
    window = min(patches, (vision.window_size // vision.patch_size) ** 2)
    vision_flops = 2 * (_num_parameters(visual.patch_embed) + _num_parameters(visual.blocks)) * patches
    vision_flops += 2 * _num_parameters(visual.merger) * patches / vision.spatial_merge_size**2
    for block in range(vision.depth):
        keys = patches if block in vision.fullatt_block_indexes else window
        vision_flops += 4 * patches * keys * vision.hidden_size
    head_dim = text.hidden_size // text.num_attention_heads
    text_flops = 2 * _num_parameters(layers) * seq_len
    text_flops += len(layers) * 2 * text.num_attention_heads * head_dim * seq_len * (seq_len + 1)
    return float(vision_flops + text_flops)


def batch_lmm_flops(model: nn.Module, batch: GroundingBatch) -> float:
    """Useful FLOPs of a batch: every sample at its own length (padding not counted)."""
    lengths = batch.lmm.attention_mask.sum(dim=1).tolist()
    grids = batch.lmm.pixel_inputs["image_grid_thw"].tolist()
    return sum(lmm_forward_flops(model, int(s), tuple(g)) for s, g in zip(lengths, grids, strict=True))


def bf16_matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """Achieved bf16 matmul TFLOP/s on random ``n x n`` operands: the practical peak of the device."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    began = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - began) / 1e12


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _image_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 640x480, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flmm_lightning.bench",
        description="Training-step throughput: the reference path (eager, per sample) vs the fast path.",
    )
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4 for tiny, 8 for GPU sizes")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per path (default 5 tiny, 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per path (default 2 tiny, 3)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--image-size", type=_image_size, default=None, help="WxH (default 256x192 tiny, 640x480)"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="SAM embedding cache (default: a temp dir)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON report (default outputs/bench/SIZE.json)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile one step of each path (torch.profiler): operator table to OUT with .profile.txt",
    )
    args = parser.parse_args(argv)
    tiny = args.size == "tiny"
    defaults = {
        "batch_size": 4 if tiny else 8,
        "steps": 5 if tiny else 10,
        "warmup": 2 if tiny else 3,
        "image_size": (256, 192) if tiny else (640, 480),
        "out": Path("outputs/bench") / f"{args.size}.json",
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch-size and --steps must be at least 1, --warmup at least 0")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} torch threads)"


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.size != "tiny" and device.type != "cuda":
        raise SystemExit(f"--size {args.size} needs a GPU (device {device} was asked for)")
    torch.manual_seed(args.seed)
    module, prompt_builder = build_bench_module(args.size, device)
    width, height = args.image_size
    num_batches = min(args.steps, 2)  # two alternating batches: no step sees exactly the previous inputs
    samples = synthetic_samples(num_batches * args.batch_size, width, height, args.seed)
    batches = prepare_batches(module, prompt_builder, samples, args.batch_size, device)

    report: dict[str, Any] = {
        "size": args.size,
        "device": device_name(device),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "image_size": [width, height],
        "lmm_dtype": str(module.lmm.model.dtype).removeprefix("torch."),
        "autocast": "bf16" if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sequence_length_mean": float(
            np.mean([float(b.batched.lmm.attention_mask.sum(1).float().mean()) for b in batches])
        ),
        "image_tokens": [g for b in batches for g in _image_tokens(b.batched)],
    }
    report.update(attention_agreement(module, batches[0], device))

    processor_ms = {
        "reference": 1e3 * float(np.mean([b.processor_singles_s for b in batches])),
        "fast": 1e3 * float(np.mean([b.processor_s for b in batches])),
    }
    processor_ms["fast_cached"] = processor_ms["fast"]
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="flmm_bench_sam_cache_"))
    try:
        cache = SamEmbeddingCache(cache_dir)
        module.sam.embedding_cache = cache
        for batch in batches:  # warm: every image's embedding on disk before the cached path's first step
            module.sam.encode_images(batch.batched.sam_images)
        paths = [
            BenchPath("reference", reference_step, capture="eager", sam_attention="reference"),
            BenchPath("fast", fast_step, capture="fused", sam_attention="sdpa"),
            BenchPath("fast_cached", fast_step, capture="fused", sam_attention="sdpa", cache=cache),
        ]
        results = run_paths(module, paths, batches, args.batch_size, args.warmup, args.steps, device)
        if args.profile:
            profile_out = args.out.with_suffix(".profile.txt")
            profile_out.parent.mkdir(parents=True, exist_ok=True)
            profile_out.write_text(profile_paths(module, paths, batches[0], device) + "\n")
            report["profile"] = str(profile_out)
    finally:
        module.sam.embedding_cache = None
        module.lmm.set_capture("fused")
        if args.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    for name, result in results.items():
        result.stages_ms = {"processor": processor_ms[name], **result.stages_ms}

    step_flops = float(np.mean([batch_lmm_flops(module.lmm.model, b.batched) for b in batches]))
    for result in results.values():
        lmm_s = result.stages_ms["lmm"] / 1e3
        result.lmm_tflops = step_flops / lmm_s / 1e12 if lmm_s > 0 else math.nan

    reference = results["reference"].samples_per_s
    report.update(
        {
            path: {key: value for key, value in asdict(result).items() if key != "stages_ms"}
            for path, result in results.items()
        }
    )
    report["speedup"] = {path: results[path].samples_per_s / reference for path in PATHS[1:]}
    report["stages"] = {path: result.stages_ms for path, result in results.items()}
    report["lmm_tflop_per_sample"] = step_flops / args.batch_size / 1e12
    report["lmm_tflops"] = {path: result.lmm_tflops for path, result in results.items()}
    if device.type == "cuda":
        peak = bf16_matmul_tflops(device)
        report["bf16_matmul_tflops"] = peak
        report["lmm_fraction_of_peak"] = {path: result.lmm_tflops / peak for path, result in results.items()}
    return report


def _image_tokens(batch: GroundingBatch) -> list[int]:
    return [h * w for h, w in batch.lmm.grid_hw]


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"flmm-lightning bench  size={report['size']}  device={report['device']}  "
        f"batch={report['batch_size']}  steps={report['steps']}  warmup={report['warmup']}  {report['date']}",
        f"{'path':<12} {'samples/s':>10} {'speedup':>8} {'step ms':>9} {'peak MiB':>9} {'extra MiB':>9} "
        f"{'LMM TFLOP/s':>11}",
    ]
    for path in PATHS:
        entry = report[path]
        speedup = report["speedup"].get(path, 1.0)
        lines.append(
            f"{path:<12} {entry['samples_per_s']:>10.2f} {speedup:>7.2f}x {entry['step_ms']:>9.1f} "
            f"{entry['peak_mem_mb']:>9.0f} {entry['peak_extra_mb']:>9.0f} {entry['lmm_tflops']:>11.3f}"
        )
    lines.append(f"memory: {report['fast']['memory_kind']}; ms per step (processor: in dataloader workers)")
    lines.append(f"{'stage':<18}" + "".join(f"{path:>13}" for path in PATHS))
    for stage in STAGES:
        lines.append(f"{stage:<18}" + "".join(f"{report['stages'][path][stage]:>13.2f}" for path in PATHS))
    lines.append(
        f"attention_max_abs_diff {report['attention_max_abs_diff']:.3g} "
        f"(maps up to {report['attention_max']:.3g}); "
        f"text_embedding_max_abs_diff {report['text_embedding_max_abs_diff']:.3g}"
    )
    lines.append(f"LMM forward {report['lmm_tflop_per_sample']:.3g} TFLOP per sample")
    if "bf16_matmul_tflops" in report:
        fractions = ", ".join(f"{k} {v:.1%}" for k, v in report["lmm_fraction_of_peak"].items())
        lines.append(f"bf16 matmul peak {report['bf16_matmul_tflops']:.0f} TFLOP/s; LMM stage at {fractions}")
    return "\n".join(lines)


def profile_paths(
    module: FLMMModule, paths: list[BenchPath], batch: BenchBatch, device: torch.device, row_limit: int = 30
) -> str:
    """Operator tables (self time, most expensive first) of one step of each path, after the timed runs."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort_by = "self_cuda_time_total"
    optimizer = module.optimizer_factory(params=[p for p in module.parameters() if p.requires_grad])
    sections = []
    for path in paths:
        path.configure(module)
        with torch.profiler.profile(activities=activities) as profiler:
            path.step(module, batch, optimizer, NoTimer(device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=row_limit)
        sections.append(f"== {path.name} ==\n{table}")
    return "\n\n".join(sections)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = " ".join(["python -m flmm_lightning.bench", *(sys.argv[1:] if argv is None else argv)])
    report = run(args, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"written to {args.out}")
    return report


if __name__ == "__main__":
    main()
