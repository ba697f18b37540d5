"""Stage timing and peak memory of training steps."""

from __future__ import annotations

import contextlib
import ctypes
import resource
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch

from flmm_lightning.core import FLMM

MIB = 2**20


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
    def instrumented(self, model: FLMM) -> Iterator[None]:
        """Times the core's stages through forward hooks while the block runs (the steps time the SAM encoder,
        ``FLMM.image_embeddings``, themselves).

        ``lmm_total`` is the adapter (model forward + reading the maps out), ``lmm`` the frozen model alone.
        """
        handles = []
        timed = {
            "lmm_total": model.lmm,
            "lmm": model.lmm.model,
            "unet": model.mask_head,
            "sam_decoder": model.sam,
        }
        for name, part in timed.items():
            handles.append(part.register_forward_pre_hook(lambda _m, _a, name=name: self.start(name)))
            handles.append(part.register_forward_hook(lambda _m, _a, _o, name=name: self.stop(name)))
        try:
            yield
        finally:
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
