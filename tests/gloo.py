"""Running a computation on two CPU processes joined by a gloo process group, as DDP ranks are: each rank's
JSON-able results come back to the test."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now (the process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_worker(rank: int, compute: Callable[[int], Any], port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(compute(rank)))
    finally:
        dist.destroy_process_group()


def results_of_gloo_ranks(compute: Callable[[int], Any], out_dir: Path) -> list[Any]:
    """``compute(rank)`` on each of ``WORLD_SIZE`` spawned processes in one gloo group (one intra-op thread
    each); ``compute`` must be a module-level function (it is pickled into the workers)."""
    mp.spawn(_rank_worker, args=(compute, free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
