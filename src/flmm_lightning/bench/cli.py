"""``python -m flmm_lightning.bench [options] [Hydra overrides of conf/train.yaml]``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from hydra.core.hydra_config import HydraConfig

from flmm_lightning.bench.agreement import attention_agreement
from flmm_lightning.bench.build import SIZES, build_bench_module, compose_bench_config
from flmm_lightning.bench.flops import bf16_matmul_tflops, useful_lmm_flops
from flmm_lightning.bench.inputs import BenchBatch, training_batches
from flmm_lightning.bench.report import format_report
from flmm_lightning.bench.steps import PATHS, bench_paths, precision, profile_paths, run_paths
from flmm_lightning.common.feature_store import FeatureStore, feature_key
from flmm_lightning.core import FLMM
from flmm_lightning.heads.sam_cache import SamEmbeddingCache


def _image_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 640x480, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flmm_lightning.bench",
        description="Training-step throughput of a configured model: per sample under eager attention vs "
        "batched under the fused capture. Model, SAM and inputs come from train's config groups.",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides, as for train (e.g. model=tiny_llava sam=tiny data.batch_size=8)",
    )
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="tiny",
        help="tiny: train.yaml's defaults; qwen2_5_vl_3b: the 3B and SAM ViT-L architectures, random weights",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="shortcut for data.batch_size=N")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per path (default 5 tiny, 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per path (default 2 tiny, 3)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--image-size",
        type=_image_size,
        default=None,
        help="resize every sample to WxH (default: the data's own sizes; 640x480 for qwen2_5_vl_3b)",
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
    args = parser.parse_intermixed_args(argv)
    size = SIZES[args.size]
    defaults = {
        "steps": size.steps,
        "warmup": size.warmup,
        "image_size": size.image_size,
        "out": Path("outputs/bench") / f"{args.size}.json",
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.batch_size is not None:
        if args.batch_size < 1:
            parser.error("--batch-size must be at least 1")
        args.overrides.append(f"data.batch_size={args.batch_size}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1, --warmup at least 0")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} torch threads)"


def warm_feature_cache(
    model: FLMM, batches: list[BenchBatch], directory: Path, repeats: int
) -> tuple[float, int]:
    """Writes every batch's frozen LMM features to a feature cache in ``directory``, then reads them back as a
    dataloader worker would (key hashing included) into ``BenchBatch.served``. Returns the mean seconds of
    one batch's read (over ``repeats`` reads of each batch) and the bytes of one batch's entries."""
    identity = model.lmm.feature_identity()
    writer = FeatureStore(directory, identity)
    with torch.no_grad(), precision(next(model.parameters()).device):
        for batch in batches:
            entries = model.lmm.frozen_features(batch.batched.lmm)
            for prompt, entry in zip(batch.prompts, entries, strict=True):
                writer.put(feature_key(identity, prompt), entry)
    writer.flush()
    reader = FeatureStore(directory, identity)
    len(reader)  # the index, read once when a worker starts
    elapsed = 0.0
    for _ in range(repeats):
        for batch in batches:
            began = time.perf_counter()
            served = [reader.get(feature_key(identity, prompt)) for prompt in batch.prompts]
            elapsed += time.perf_counter() - began
            if any(entry is None for entry in served):
                raise RuntimeError(f"feature cache {directory}: a bench entry was not served back")
            batch.served = dataclasses.replace(batch.batched, cached_features=served)
    size = sum(path.stat().st_size for path in directory.rglob("*.safetensors")) // len(batches)
    return elapsed / (repeats * len(batches)), size


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    if size.needs_gpu and device.type != "cuda":
        raise SystemExit(f"--size {args.size} needs a GPU (device {device} was asked for)")
    torch.manual_seed(args.seed)
    cfg = compose_bench_config(size, args.overrides)
    module, prompt_builder = build_bench_module(cfg, size, device)
    model = module.model
    num_batches = min(args.steps, 2)  # two alternating batches: no step sees exactly the previous inputs
    batches = training_batches(cfg, module, prompt_builder, num_batches, args.image_size, device)
    batch_size = len(batches[0].singles)
    clip_norm = float(cfg.trainer.gradient_clip_val)

    report: dict[str, Any] = {
        "size": args.size,
        "model": cfg.model.name,
        "sam": cfg.sam.name,
        "data": HydraConfig.get().runtime.choices["data"],
        "overrides": list(HydraConfig.get().overrides.task),
        "device": device_name(device),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "batch_size": batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "image_size": list(args.image_size) if args.image_size else None,
        "lmm_dtype": str(model.lmm.model.dtype).removeprefix("torch."),
        "autocast": "bf16" if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sequence_length_mean": float(
            np.mean([float(b.batched.lmm.attention_mask.sum(1).float().mean()) for b in batches])
        ),
        "image_tokens": [h * w for b in batches for h, w in b.batched.lmm.grid_hw],
    }
    report.update(attention_agreement(model, batches[0], device))

    processor_ms = {
        "per_sample_eager": 1e3 * float(np.mean([b.processor_singles_s for b in batches])),
        "fast": 1e3 * float(np.mean([b.processor_s for b in batches])),
    }
    processor_ms["fast_cached"] = processor_ms["fast_featcache"] = processor_ms["fast"]
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="flmm_bench_sam_cache_"))
    try:
        cache = SamEmbeddingCache(cache_dir)
        model.sam.embedding_cache = cache
        for batch in batches:  # warm: every image's embedding on disk before the cached path's first step
            model.image_embeddings(batch.batched)
        feature_read_s, feature_bytes = warm_feature_cache(
            model, batches, cache_dir / "lmm_features", args.steps
        )
        paths = bench_paths(cache)
        results = run_paths(module, paths, batches, args.warmup, args.steps, clip_norm, device)
        if args.profile:
            profile_out = args.out.with_suffix(".profile.txt")
            profile_out.parent.mkdir(parents=True, exist_ok=True)
            profile_out.write_text(profile_paths(module, paths, batches[0], clip_norm, device) + "\n")
            report["profile"] = str(profile_out)
    finally:
        model.sam.embedding_cache = None
        model.lmm.set_capture("fused")
        if args.cache_dir is None:
            shutil.rmtree(cache_dir, ignore_errors=True)
    for name, result in results.items():
        read_ms = 1e3 * feature_read_s if name == "fast_featcache" else 0.0
        result.stages_ms = {
            "processor": processor_ms[name],
            "feature_cache_read": read_ms,
            **result.stages_ms,
        }

    step_flops = useful_lmm_flops(model.lmm, batches)
    for result in results.values():
        lmm_s = result.stages_ms["lmm"] / 1e3
        # None: the path ran no LMM forward (its features came from the cache)
        result.lmm_tflops = step_flops / lmm_s / 1e12 if lmm_s > 0 else None
    replaced_ms = results["fast"].stages_ms["lmm"] + results["fast"].stages_ms["attention_capture"]
    report["feature_cache"] = {
        "read_ms": 1e3 * feature_read_s,
        "bytes_per_sample": feature_bytes / batch_size,
        "lmm_and_capture_ms": replaced_ms,
        "ratio": replaced_ms / (1e3 * feature_read_s),
        "step_speedup": results["fast_featcache"].samples_per_s / results["fast_cached"].samples_per_s,
    }

    baseline = results[PATHS[0]].samples_per_s
    report.update(
        {
            path: {key: value for key, value in asdict(result).items() if key != "stages_ms"}
            for path, result in results.items()
        }
    )
    report["speedup"] = {path: results[path].samples_per_s / baseline for path in PATHS[1:]}
    report["stages"] = {path: result.stages_ms for path, result in results.items()}
    report["lmm_tflop_per_sample"] = step_flops / batch_size / 1e12
    report["lmm_tflops"] = {path: result.lmm_tflops for path, result in results.items()}
    if device.type == "cuda":
        peak = bf16_matmul_tflops(device)
        report["bf16_matmul_tflops"] = peak
        report["lmm_fraction_of_peak"] = {
            path: None if result.lmm_tflops is None else result.lmm_tflops / peak
            for path, result in results.items()
        }
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    command = " ".join(["python -m flmm_lightning.bench", *(sys.argv[1:] if argv is None else argv)])
    report = run(args, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"written to {args.out}")
    return report
