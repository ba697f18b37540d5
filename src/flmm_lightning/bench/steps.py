"""The training step of each path, and running them in alternating rounds."""

from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from flmm_lightning.bench.inputs import BenchBatch
from flmm_lightning.bench.timing import MemoryMeter, NoTimer, StageTimer
from flmm_lightning.core import FLMM
from flmm_lightning.data.batch import GroundingBatch
from flmm_lightning.heads.sam_cache import SamEmbeddingCache
from flmm_lightning.training.module import FLMMModule

PATHS = ("per_sample_eager", "fast", "fast_cached", "fast_featcache")
STAGES = (
    "processor",
    "feature_cache_read",
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


def precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Lightning's ``bf16-mixed`` on a GPU; fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_loss(model: FLMM, batch: GroundingBatch, timer: StageTimer) -> torch.Tensor:
    """The loss ``training_step`` back-propagates (the core's forward and losses), the SAM encoder and the
    losses timed as their stages."""
    with timer.span("sam_encoder"):
        image_embeddings = model.image_embeddings(batch)
    predictions = model(batch, image_embeddings=image_embeddings)
    with timer.span("losses"):
        return model.losses(batch, predictions)["loss"]


def optimizer_step(
    model: FLMM, optimizer: torch.optim.Optimizer, clip_norm: float, timer: StageTimer
) -> None:
    with timer.span("optimizer"):
        parameters = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@dataclass
class StepContext:
    optimizer: torch.optim.Optimizer
    clip_norm: float


def fast_step(model: FLMM, batch: BenchBatch, step: StepContext, timer: StageTimer) -> None:
    with precision(timer.device):
        loss = training_loss(model, batch.batched, timer)
    with timer.span("backward"):
        loss.backward()
    optimizer_step(model, step.optimizer, step.clip_norm, timer)


def featcache_step(model: FLMM, batch: BenchBatch, step: StepContext, timer: StageTimer) -> None:
    """``fast_step`` on the batch as the LMM feature cache serves it: no LMM forward, no capture."""
    if batch.served is None:
        raise ValueError("fast_featcache needs the batch's cached LMM features (BenchBatch.served)")
    fast_step(model, dataclasses.replace(batch, batched=batch.served), step, timer)


def per_sample_eager_step(model: FLMM, batch: BenchBatch, step: StepContext, timer: StageTimer) -> None:
    """One sample per forward and one backward per sample, each loss weighted by its share of the batch's
    objects (so that the gradient is the batched path's), then one optimizer step."""
    total_objects = sum(single.samples[0].num_objects for single in batch.singles)
    for single in batch.singles:
        with precision(timer.device):
            share = single.samples[0].num_objects / total_objects
            loss = training_loss(model, single, timer) * share
        with timer.span("backward"):
            loss.backward()
    optimizer_step(model, step.optimizer, step.clip_norm, timer)


StepFn = Callable[[FLMM, BenchBatch, StepContext, StageTimer], None]


@dataclass
class BenchPath:
    """How one path runs: its step function, the LMM's attention capture (with it, the vision tower's packed
    attention under ``fused``), the SAM encoder's attention and the SAM embedding cache it uses."""

    name: str
    step: StepFn
    capture: str
    sam_attention: str
    cache: SamEmbeddingCache | None = None

    def configure(self, model: FLMM) -> None:
        model.lmm.set_capture(self.capture)
        model.sam.set_encoder_attention(self.sam_attention)
        model.sam.embedding_cache = self.cache


def bench_paths(cache: SamEmbeddingCache) -> list[BenchPath]:
    return [
        BenchPath("per_sample_eager", per_sample_eager_step, capture="eager", sam_attention="reference"),
        BenchPath("fast", fast_step, capture="fused", sam_attention="sdpa"),
        BenchPath("fast_cached", fast_step, capture="fused", sam_attention="sdpa", cache=cache),
        BenchPath("fast_featcache", featcache_step, capture="fused", sam_attention="sdpa", cache=cache),
    ]


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


def new_step_context(module: FLMMModule, clip_norm: float) -> StepContext:
    """The module's own optimizer (``module.optimizer`` of the config) over its trainable parameters."""
    optimizer = module.optimizer_factory(params=[p for p in module.parameters() if p.requires_grad])
    return StepContext(optimizer, clip_norm)


def run_paths(
    module: FLMMModule,
    paths: list[BenchPath],
    batches: list[BenchBatch],
    warmup: int,
    steps: int,
    clip_norm: float,
    device: torch.device,
) -> dict[str, PathResult]:
    """Warm-up and one peak-memory step per path, then timed rounds, then instrumented rounds.

    A round runs one step of every path in turn: a change in the machine's load (a shared CPU, clocks) falls
    on all paths alike instead of on whichever ran at the time. The paths share the module and the optimizer:
    trainable weight values do not change the cost of a step.
    """
    context = new_step_context(module, clip_norm)
    batch_size = len(batches[0].singles)
    untimed = NoTimer(device)
    memory: dict[str, tuple[float, float, str]] = {}
    for path in paths:
        path.configure(module.model)
        for i in range(warmup):
            path.step(module.model, batches[i % len(batches)], context, untimed)
        meter = MemoryMeter(device)
        meter.start()
        path.step(module.model, batches[0], context, untimed)
        peak = meter.peak_mib()
        memory[path.name] = (peak, peak - meter.base_mib, meter.kind)
        if path.cache is not None:
            path.cache.stats.reset()

    elapsed: dict[str, float] = defaultdict(float)
    clock = StageTimer(device)
    for i in range(steps):
        for path in paths:
            path.configure(module.model)
            began = clock.now()
            path.step(module.model, batches[i % len(batches)], context, untimed)
            elapsed[path.name] += clock.now() - began

    timers = {path.name: StageTimer(device) for path in paths}
    staged: dict[str, float] = defaultdict(float)
    for i in range(steps):
        for path in paths:
            path.configure(module.model)
            timer = timers[path.name]
            with timer.instrumented(module.model):
                began = timer.now()
                path.step(module.model, batches[i % len(batches)], context, timer)
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
    """ms per step for each stage of ``STAGES`` except the dataloader workers' "processor" and
    "feature_cache_read" (added by the caller)."""
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


def profile_paths(
    module: FLMMModule,
    paths: list[BenchPath],
    batch: BenchBatch,
    clip_norm: float,
    device: torch.device,
    row_limit: int = 30,
) -> str:
    """Operator tables (self time, most expensive first) of one step of each path, after the timed runs."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort_by = "self_cuda_time_total"
    context = new_step_context(module, clip_norm)
    sections = []
    for path in paths:
        path.configure(module.model)
        with torch.profiler.profile(activities=activities) as profiler:
            path.step(module.model, batch, context, NoTimer(device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=row_limit)
        sections.append(f"== {path.name} ==\n{table}")
    return "\n\n".join(sections)
