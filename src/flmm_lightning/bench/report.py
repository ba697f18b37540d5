"""The bench report as text."""

from __future__ import annotations

from typing import Any

from flmm_lightning.bench.steps import PATHS, STAGES


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"flmm-lightning bench  size={report['size']}  model={report['model']}  sam={report['sam']}  "
        f"device={report['device']}",
        f"batch={report['batch_size']}  steps={report['steps']}  warmup={report['warmup']}  {report['date']}",
        f"{'path':<17} {'samples/s':>10} {'speedup':>8} {'step ms':>9} {'peak MiB':>9} {'extra MiB':>9} "
        f"{'LMM TFLOP/s':>11}",
    ]
    for path in PATHS:
        entry = report[path]
        speedup = report["speedup"].get(path, 1.0)
        tflops = "-" if entry["lmm_tflops"] is None else f"{entry['lmm_tflops']:.3f}"
        lines.append(
            f"{path:<17} {entry['samples_per_s']:>10.2f} {speedup:>7.2f}x {entry['step_ms']:>9.1f} "
            f"{entry['peak_mem_mb']:>9.0f} {entry['peak_extra_mb']:>9.0f} {tflops:>11}"
        )
    lines.append(f"memory: {report['fast']['memory_kind']}; ms per step (processor: in dataloader workers)")
    lines.append(f"{'stage':<18}" + "".join(f"{path:>17}" for path in PATHS))
    for stage in STAGES:
        lines.append(f"{stage:<18}" + "".join(f"{report['stages'][path][stage]:>17.2f}" for path in PATHS))
    lines.append(
        f"attention_max_abs_diff {report['attention_max_abs_diff']:.3g} "
        f"(maps up to {report['attention_max']:.3g}); "
        f"text_embedding_max_abs_diff {report['text_embedding_max_abs_diff']:.3g}"
    )
    lines.append(f"LMM forward {report['lmm_tflop_per_sample']:.3g} TFLOP per sample (FlopCounterMode)")
    cache = report["feature_cache"]
    lines.append(
        f"feature cache: read {cache['read_ms']:.2f} ms per batch "
        f"({cache['bytes_per_sample'] / 2**20:.2f} MiB per sample) vs LMM forward + capture "
        f"{cache['lmm_and_capture_ms']:.2f} ms on the fast path: "
        f"{cache['ratio']:.1f}x; whole step fast_featcache vs fast_cached {cache['step_speedup']:.2f}x"
    )
    if "bf16_matmul_tflops" in report:
        fractions = ", ".join(
            f"{k} {v:.1%}" for k, v in report["lmm_fraction_of_peak"].items() if v is not None
        )
        lines.append(f"bf16 matmul peak {report['bf16_matmul_tflops']:.0f} TFLOP/s; LMM stage at {fractions}")
    return "\n".join(lines)
