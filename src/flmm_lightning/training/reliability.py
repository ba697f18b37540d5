"""Surviving crashes and bad numbers: atomic checkpoint files, a clear error on a full disk, the final state
saved whatever the checkpoint cadence, a checkpoint on Ctrl-C / SIGTERM, dataloader workers that die with the
trainer, and the non-finite-loss guard of training (a callback)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from flmm_lightning.common.distributed import all_gather_objects
from flmm_lightning.common.files import atomic_write

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to ``.<name>.tmp`` in the target's own directory, fsyncs it, then renames it over
    the target: a process killed at any point leaves the old file or the new one, never a truncated one.

    Lightning's own save goes through a temporary file in the *system* temp directory and moves it into
    place; when that directory is on another filesystem (a node-local /tmp, checkpoints on shared storage) the
    move is a copy onto the target, and a kill during the copy truncates it. Nothing is fsynced either, so
    after a power loss the renamed file can be empty. Remote (fsspec) paths keep Lightning's behaviour.

    A kill leaves the partial ``.<name>.tmp`` behind; the next save of the same target overwrites it.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options for local paths")
        target = Path(path)
        writer = _WriteErrorRecorder()
        try:
            with atomic_write(target, durable=True, temp_name=f".{target.name}.tmp") as file:
                writer.file = file
                torch.save(checkpoint, writer)
        except (OSError, RuntimeError) as error:
            # torch.save turns a failed write into "unexpected pos ..."; the recorder kept the OS error.
            cause = writer.error or error
            if isinstance(cause, OSError) and cause.errno in _NO_ROOM:
                raise CheckpointSpaceError(
                    cause.errno, _no_room_message(checkpoint, target, cause)
                ) from error
            raise


# A full disk, a full quota, a file-size limit: the checkpoint does not fit where it is written.
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointSpaceError(OSError):
    """A checkpoint that does not fit in its folder; the message names the folder, the bytes the checkpoint
    needs and the bytes free there. The previous checkpoint of that name is left as it was."""


class _WriteErrorRecorder:
    """A file wrapper for ``torch.save`` that keeps the ``OSError`` of a failed write."""

    def __init__(self) -> None:
        self.file: Any = None
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


class _ByteCounter:
    """A file for ``torch.save`` that keeps nothing and counts the bytes written to it."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _no_room_message(checkpoint: dict[str, Any], target: Path, error: OSError) -> str:
    needed = _ByteCounter()
    torch.save(checkpoint, needed)
    free = shutil.disk_usage(target.parent).free
    return (
        f"no room to write the checkpoint {target.name} in {target.parent}: it needs {needed.size:,} bytes, "
        f"{free:,} bytes are free there ({os.strerror(error.errno)}); free some space or set "
        f"callbacks.model_checkpoint.dirpath to another disk. The previous {target.name} is kept."
    )


class NonFiniteLossError(RuntimeError):
    """Too many consecutive training batches with a NaN/Inf loss; names their samples."""


@dataclass
class NonFiniteStreak:
    """The current run of consecutive non-finite batches (this rank's samples) and the total skipped steps.

    Every rank feeds it the same sequence of decisions (the non-finite flag is reduced across ranks before it
    gets here), so every rank reaches the limit at the same batch and raises together: no rank is left
    waiting in a collective.
    """

    limit: int
    skipped_steps: int = 0
    batches: list[tuple[int, list[str]]] = field(default_factory=list)  # (global step, sample names)

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"max_consecutive_nonfinite must be at least 1, got {self.limit}")

    def record(self, step: int, sample_names: list[str]) -> None:
        """One more non-finite batch; ``sample_names``: this rank's samples (empty if its loss was finite)."""
        self.batches.append((step, sample_names))
        log.warning(
            "step %d: non-finite loss (%s); the optimizer step is skipped (%d consecutive)",
            step,
            ", ".join(sample_names) if sample_names else "on another rank",
            len(self.batches),
        )

    def reset(self) -> None:
        self.batches.clear()

    @property
    def exhausted(self) -> bool:
        return len(self.batches) >= self.limit

    def error(self) -> NonFiniteLossError:
        """The error naming every rank's samples of the streak (a collective: call it on every rank)."""
        local = [(step, names) for step, names in self.batches if names]
        lines = [
            f"  step {step} (rank {rank}): {', '.join(names)}"
            for rank, batches in enumerate(all_gather_objects(local))
            for step, names in batches
        ]
        return NonFiniteLossError(
            f"{len(self.batches)} consecutive training batches had a non-finite loss "
            f"(module.max_consecutive_nonfinite={self.limit}); their optimizer steps were skipped. "
            "Samples of those batches:\n" + "\n".join(lines)
        )


# Where the running totals of training callbacks ride in a checkpoint, so that a resumed run goes on counting.
COUNTERS_KEY = "flmm_counters"


class NonFiniteLossGuard(Callback):
    """A NaN/Inf training loss never reaches the weights.

    Before every backward one all-reduce tells each rank whether any rank's loss is non-finite and whether
    any rank has samples (a rank whose samples were all skipped back-propagates the module's zero loss, so
    that DDP's gradient all-reduce completes). At the optimizer step of a window (several batches under
    gradient accumulation) that saw a non-finite loss, or no sample on any rank, every rank drops the
    gradients (set to None, the non-finite ones included): the optimizer leaves the weights, moments and
    weight decay untouched, and the step still counts (the schedule and ``max_steps`` do not move).
    ``train/skipped_nonfinite_steps`` counts the skipped steps. ``max_consecutive`` non-finite batches in a
    row stop the run with ``NonFiniteLossError`` naming every rank's samples; every rank takes the same
    decisions, so all of them raise at the same batch and none is left waiting in a collective.

    ``max_consecutive``: None takes the module's ``max_consecutive_nonfinite`` (the module config).
    """

    def __init__(self, max_consecutive: int | None = None) -> None:
        self.max_consecutive = max_consecutive
        self.streak: NonFiniteStreak | None = None
        self._restored_skipped_steps = 0
        self._sample_names: list[str] = []
        self._window_nonfinite = False
        self._window_has_samples = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Only a fit trains: a test loop after it may run another module (the reasoning evaluator), in a
        # process where the fit never set the streak up (ddp_spawn's parent)
        if self.streak is None and stage == "fit":
            limit = self.max_consecutive
            if limit is None:
                limit = pl_module.max_consecutive_nonfinite
            self.streak = NonFiniteStreak(limit, skipped_steps=self._restored_skipped_steps)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int):
        self._sample_names = [f"{s.image_id} ({s.file_name})" for s in batch.samples]

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        has_samples = bool(self._sample_names)
        local_nonfinite = has_samples and not bool(torch.isfinite(loss))
        flags = torch.tensor([float(local_nonfinite), float(has_samples)], device=pl_module.device)
        nonfinite_ranks, ranks_with_samples = trainer.strategy.reduce(flags, reduce_op="sum").tolist()
        self._window_has_samples |= ranks_with_samples > 0
        if nonfinite_ranks > 0:
            self._window_nonfinite = True
            self.streak.record(trainer.global_step, self._sample_names if local_nonfinite else [])
            if self.streak.exhausted:
                raise self.streak.error()
        elif ranks_with_samples > 0:
            self.streak.reset()

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        skip = self._window_nonfinite or not self._window_has_samples
        if self._window_nonfinite:
            self.streak.skipped_steps += 1
        self._window_nonfinite = self._window_has_samples = False
        pl_module.log("train/skipped_nonfinite_steps", float(self.streak.skipped_steps), reduce_fx="max")
        if skip:
            # Optimizers skip parameters whose gradient is None: no update, no moment or weight-decay change.
            optimizer.zero_grad(set_to_none=True)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]):
        checkpoint.setdefault(COUNTERS_KEY, {})["skipped_nonfinite_steps"] = self.streak.skipped_steps

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]):
        skipped = checkpoint.get(COUNTERS_KEY, {}).get("skipped_nonfinite_steps", 0)
        self._restored_skipped_steps = skipped
        if self.streak is not None:
            self.streak.skipped_steps = skipped


def last_checkpoint_path(trainer: Trainer) -> Path:
    """``last.ckpt`` in the folder of the trainer's checkpoint callback (else ``<root>/checkpoints``)."""
    callback = trainer.checkpoint_callback
    folder = callback.dirpath if callback is not None and callback.dirpath else None
    return Path(folder or Path(trainer.default_root_dir) / "checkpoints") / "last.ckpt"


class FinalCheckpoint(Callback):
    """When training ends, the state of its last step is in ``last.ckpt``, whatever the cadence of the
    checkpoint callback and of validation (``max_steps`` not a multiple of ``every_n_train_steps``, no
    validation): a step that no checkpoint saved is saved here. A trainer with checkpointing turned off
    (``enable_checkpointing=False``) saves nothing."""

    def __init__(self) -> None:
        self._saved_step: int | None = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]):
        self._saved_step = trainer.global_step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.checkpoint_callback is None or trainer.global_step in (0, self._saved_step):
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        log.info(
            "training ended at step %d, after the last periodic checkpoint: saved %s",
            trainer.global_step,
            path,
        )


class CheckpointOnInterrupt(Callback):
    """Ctrl-C (SIGINT) or SIGTERM (``kill``, a SLURM pre-emption) during training: the batch in progress
    finishes, ``last.ckpt`` is saved (through the trainer's checkpoint IO: ``AtomicCheckpointIO`` writes a
    temporary file and renames it) and the run stops; ``ckpt_path=<run>/checkpoints/last.ckpt`` resumes
    from that step. A second Ctrl-C stops at once, without saving.

    The checkpoint is taken where ``ModelCheckpoint`` takes its own (the end of a training batch), never in
    the middle of an optimizer step. SIGTERM is Lightning's own handling (it stops after the batch); this
    callback saves first. Under DDP every rank stops at the same batch (the decision is reduced).
    """

    def __init__(self) -> None:
        self._sigint = False
        self._previous_handler: Any = None
        self._saved_step: int | None = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._sigint:
            raise KeyboardInterrupt
        self._sigint = True
        log.warning("Ctrl-C: saving a checkpoint after this training batch, then stopping (again: stop now)")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sigint = False
        self._saved_step = None
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
        self._previous_handler = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handler()
        if self._sigint:  # after the last batch (e.g. in the last validation): the run is complete
            raise KeyboardInterrupt

    def _save(self, trainer: Trainer) -> None:
        if self._saved_step == trainer.global_step:
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self._saved_step = trainer.global_step
        log.warning("interrupted at step %d: saved %s", trainer.global_step, path)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        requested = trainer.strategy.reduce_boolean_decision(
            self._sigint or trainer.received_sigterm, all=False
        )
        if not requested:
            return
        self._save(trainer)
        if not trainer.received_sigterm:  # SIGTERM: Lightning stops the run itself after this batch
            self._restore_handler()
            raise KeyboardInterrupt

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        # Lightning stops a SIGTERMed run between two batches (training or validation ones); when the signal
        # came after this callback's batch-end check, it saves here (Lightning resumes mid-validation too).
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING:
            self._save(trainer)
