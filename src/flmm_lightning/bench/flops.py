"""FLOPs of the frozen LMM's forward, as ``torch.utils.flop_counter`` counts them, and the device's peak."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from flmm_lightning.bench.inputs import BenchBatch
from flmm_lightning.boundaries import LMMBatch
from flmm_lightning.lmm.hf import HFGroundingAdapter


@torch.no_grad()
def lmm_forward_flops(lmm: HFGroundingAdapter, batch: LMMBatch) -> int:
    """FLOPs of the adapter's forward over ``batch`` (a multiply-add counts 2), any family.

    Counted under the ``eager`` capture, where attention is plain matmuls (``QK^T`` and ``AV`` over the whole
    ``S x S``, the causal mask applied after), which the counter knows on every device; fused SDPA kernels
    have no CPU formula. Padding tokens are counted as the model computes them. The capture's own read-out
    and the phrase projection are included (well under 1 % of the forward).
    """
    capture = lmm.capture.name
    lmm.set_capture("eager")
    try:
        with FlopCounterMode(display=False) as counter:
            lmm(batch)
    finally:
        lmm.set_capture(capture)
    return counter.get_total_flops()


def useful_lmm_flops(lmm: HFGroundingAdapter, batches: list[BenchBatch]) -> float:
    """Mean FLOPs per batch with every sample at its own length (one forward per sample: no padding)."""
    totals = [sum(lmm_forward_flops(lmm, single.lmm) for single in batch.singles) for batch in batches]
    return float(sum(totals) / len(totals))


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
