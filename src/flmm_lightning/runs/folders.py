"""Which folder a run writes into. Every file in a run folder belongs to one run: a new run never writes
into a folder that holds another run's files (it would mix ``metrics.json`` of one run with the
``last.ckpt`` of another), a resume continues its own run's folder, and ``latest`` beside the run folders
names the newest one."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

LATEST = "latest"
# What Hydra writes into a run folder before the run starts: its config copy and the job's log.
_HYDRA_FILES = (".hydra",)
_HYDRA_LOG_SUFFIX = ".log"


class RunDirectoryInUseError(RuntimeError):
    """A new run pointed at a folder that holds another run's files."""


def checkpoint_run_dir(ckpt_path: str | os.PathLike | None) -> Path | None:
    """The run folder of a checkpoint this project wrote (``<run>/checkpoints/<name>.ckpt``), else None."""
    if not ckpt_path:
        return None
    checkpoint = Path(ckpt_path).resolve()
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def run_dir(ckpt_path: str | None, fresh: str) -> str:
    """Resolver ``${flmm_run_dir:<ckpt_path>,<fresh>}`` (``hydra.run.dir``): a resume continues in the run
    folder of its checkpoint, any other run gets the ``fresh`` folder."""
    resumed = checkpoint_run_dir(ckpt_path)
    return str(resumed) if resumed is not None else fresh


def other_run_files(output_dir: Path) -> list[str]:
    """Names in ``output_dir`` that a previous run left (Hydra's own ``.hydra/`` and ``*.log`` excluded)."""
    if not output_dir.is_dir():
        return []
    return sorted(
        entry.name
        for entry in output_dir.iterdir()
        if entry.name not in _HYDRA_FILES and not entry.name.endswith(_HYDRA_LOG_SUFFIX)
    )


def claim_run_dir(output_dir: Path, ckpt_path: str | os.PathLike | None = None) -> None:
    """Refuses ``output_dir`` when it holds another run's files; a resume from a checkpoint of the run in
    ``output_dir`` continues it there. Global rank 0 only (the other ranks write into rank 0's folder)."""
    if rank_zero_only.rank != 0:
        return
    if checkpoint_run_dir(ckpt_path) == output_dir.resolve():
        return
    leftovers = other_run_files(output_dir)
    if leftovers:
        raise RunDirectoryInUseError(
            f"{output_dir} holds the files of another run ({', '.join(leftovers[:5])}): a run writes into a "
            "folder of its own. Leave hydra.run.dir at its default (a new timestamped folder), pick a new "
            "one, or resume that run with ckpt_path=<its folder>/checkpoints/last.ckpt"
        )


def mark_latest(output_dir: Path) -> Path:
    """Points ``<parent>/latest`` at ``output_dir`` (a relative symlink, swapped in atomically); where the
    filesystem has no symlinks, ``latest`` is a text file holding the folder's path. Global rank 0 only."""
    output_dir = output_dir.resolve()
    link = output_dir.parent / LATEST
    if rank_zero_only.rank != 0:
        return link
    output_dir.mkdir(parents=True, exist_ok=True)  # a run that has written nothing yet
    staged = link.with_name(f".{LATEST}.{os.getpid()}.tmp")
    staged.unlink(missing_ok=True)
    try:
        staged.symlink_to(output_dir.name, target_is_directory=True)
    except OSError as error:
        log.warning("cannot create a symlink in %s (%s): %s names the newest run", link.parent, error, link)
        staged.write_text(f"{output_dir}\n")
    try:
        os.replace(staged, link)
    except OSError as error:  # e.g. a folder of that name: leave it, the run itself is not affected
        staged.unlink(missing_ok=True)
        log.warning("cannot point %s at the newest run %s: %s", link, output_dir, error)
    return link


class FreshRunDirectory(HydraCallback):
    """Hydra callback: checks ``hydra.run.dir`` before Hydra writes its ``.hydra/`` config into it, so that a
    refused run leaves the other run's files untouched. It ends the process itself: Hydra turns an exception
    of a callback into a warning and runs the job anyway."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        output_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        try:
            claim_run_dir(output_dir, OmegaConf.select(config, "ckpt_path", default=None))
        except RunDirectoryInUseError as error:
            raise SystemExit(f"error: {error}") from None
