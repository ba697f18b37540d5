"""The DataLoader workers' start: they die with the process that started them, then Lightning seeds them."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

from lightning.fabric.utilities.seed import pl_worker_init_function

# prctl(2) option: the signal a process gets when the thread that forked it exits.
_PR_SET_PDEATHSIG = 1


def dataloader_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader: the worker dies with the training process, then Lightning's
    per-worker seeding runs (Lightning only adds that itself when no ``worker_init_fn`` is set).

    A trainer killed with SIGKILL (by the OOM killer, by hand) cannot stop its workers; they would stay
    forever, each holding a copy of the dataset, blocked on a result pipe nobody reads. On Linux the kernel
    sends them SIGKILL when the thread that started them ends (Lightning starts them from the main thread).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        parent = multiprocessing.parent_process()
        if parent is not None and os.getppid() != parent.pid:
            os._exit(1)  # the trainer died before prctl took effect
    if int(os.environ.get("PL_SEED_WORKERS", "0")):
        pl_worker_init_function(worker_id)
