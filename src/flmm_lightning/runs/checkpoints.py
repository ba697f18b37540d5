"""Reading a checkpoint (a ``.ckpt`` or a ``save_pretrained`` directory) without running anything it
carries, checking that it continues or fine-tunes the same model, and rebuilding the model it stores."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flmm_lightning.boundaries import PromptBuilder
from flmm_lightning.config.composition import (
    check_input_files,
    checked_config_on_this_machine,
    prepare_stored_assets,
)
from flmm_lightning.config.stored import parse_stored_config
from flmm_lightning.core import FLMM, CheckpointMismatchError
from flmm_lightning.runs.build import MODEL_KEYS, build_core, instantiate_module
from flmm_lightning.runs.pretrained import is_pretrained_dir, load_pretrained
from flmm_lightning.training.module import FLMMModule, core_state_dict


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a checkpoint without executing anything it carries (``weights_only=True``) and without reading
    its tensors (``mmap=True``: a tensor is read from the file when used, after ``core.FLMM`` checked its
    shape and dtype; a compressed record, whose declared size the file need not hold, is refused). A
    directory is read as a ``save_pretrained`` one (``runs.pretrained.load_pretrained``: safetensors and
    JSON)."""
    path = Path(path)
    if is_pretrained_dir(path):
        return load_pretrained(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"cannot load checkpoint {path} safely (weights_only=True): {error}") from error


def _stored_config(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The checkpoint's model config, checked by ``config.stored`` before anything may be built from it."""
    stored = checkpoint.get("flmm_config")
    if not isinstance(stored, dict) or any(key not in stored for key in MODEL_KEYS):
        raise ValueError(f"{path} was not written by flmm-lightning (no model config inside)")
    return parse_stored_config(stored, path)


def model_identity(config: DictConfig) -> dict[str, Any]:
    """What makes two runs the same model beyond tensor shapes: the LMM adapter (family), the model's name,
    its pretrained weights (the last path component: a hub id and a local copy of it agree) and the SAM
    variant. (Layers x heads are the U-Net's input channels: loading the weights compares those shapes.)
    ``config``: a model-defining config on this machine (``config.composition.config_on_this_machine``), so
    values are compared resolved, however they are written (a tiny asset's resolver, ``${paths.*}``,
    another key)."""
    pretrained = str(OmegaConf.select(config, "model.pretrained", default="")).rstrip("/")
    return {
        "model.lmm._target_": OmegaConf.select(config, "model.lmm._target_"),
        "model.name": OmegaConf.select(config, "model.name"),
        "model.pretrained": pretrained.rsplit("/", 1)[-1],
        "sam.name": OmegaConf.select(config, "sam.name"),
    }


def check_resume(
    path: str | Path, config: dict[str, Any], paths: DictConfig | Mapping[str, Any] | None = None
) -> None:
    """A resume must continue the same model: the checkpoint's stored config must pass ``config.stored`` and
    name the LMM and SAM of this run (``config``: its ``run_config``), both read with this machine's
    ``paths`` (the defaults when None). Lightning then loads its state."""
    stored = read_checkpoint(path).stored
    mismatches = _identity_mismatches(stored, config, paths, path)
    if mismatches:
        raise CheckpointMismatchError(
            f"cannot resume from {path}: it was trained with another model ({'; '.join(mismatches)}). "
            "Resume with the checkpoint's own model and SAM, or start a new run."
        )


def _identity_mismatches(
    stored: dict[str, Any], config: dict[str, Any], paths: DictConfig | Mapping[str, Any] | None, path: Path
) -> list[str]:
    stored_identity = model_identity(checked_config_on_this_machine(stored, paths, source=str(path)))
    identity = model_identity(checked_config_on_this_machine(config, paths, source="this run"))
    return [
        f"{key}: {stored_identity[key]!r} in the checkpoint, {identity[key]!r} in this run"
        for key in identity
        if stored_identity[key] != identity[key]
    ]


def trained_checkpoint_path(source: str | Path) -> Path:
    """``init_from``'s checkpoint: the file itself, or the ``checkpoints/last.ckpt`` of a run folder."""
    path = Path(source)
    return path / "checkpoints" / "last.ckpt" if path.is_dir() else path


def check_init_from(
    source: str | Path, config: dict[str, Any], paths: DictConfig | Mapping[str, Any] | None = None
) -> Path:
    """Fine-tuning's source, checked before anything is built: a checkpoint written by this project (or a
    run folder holding one) of this run's LMM and SAM (``config``: its ``run_config``). Returns its path."""
    path = trained_checkpoint_path(source)
    mismatches = _identity_mismatches(read_checkpoint(path).stored, config, paths, path)
    if mismatches:
        raise CheckpointMismatchError(
            f"cannot fine-tune from {path}: it was trained with another model ({'; '.join(mismatches)}). "
            "Choose the checkpoint's own model= and sam=, or train from scratch without init_from."
        )
    return path


def initialize_from(module: FLMMModule, path: str | Path) -> None:
    """Fine-tuning: loads the trainable weights of checkpoint ``path`` (``check_init_from``) into
    ``module``; its optimizer state, step and schedule are not taken."""
    module.load_checkpoint_weights(load_checkpoint(path)["state_dict"])


@dataclass
class CheckpointContents:
    """A checkpoint read once: where it came from, its stored config (checked by ``config.stored``) and its
    tensors (memory-mapped)."""

    path: Path
    stored: dict[str, Any]
    state_dict: dict[str, Any]


def read_checkpoint(path: str | Path) -> CheckpointContents:
    """Reads ``path`` (``load_checkpoint``) and checks its stored config, once."""
    checkpoint = load_checkpoint(path)
    stored = _stored_config(checkpoint, path)
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict):
        raise CheckpointMismatchError(f"{path}: no state_dict of tensors inside")
    return CheckpointContents(Path(path), stored, state_dict)


def config_here(
    contents: CheckpointContents,
    paths: DictConfig | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> DictConfig:
    """The checkpoint's stored config resolved on this machine (``config.composition.config_on_this_machine``:
    ``paths``, this machine's ``paths.*``, the defaults when None; ``overrides``, the command line's patches
    of stored sections), with the inputs it names prepared: a tiny asset built here as on the machine that
    trained it, and any other input file checked to exist."""
    source = str(contents.path)
    config = checked_config_on_this_machine(contents.stored, paths, overrides, source=source)
    prepare_stored_assets(contents.stored, config)
    check_input_files(config, contents.stored, source=source)
    return config


@dataclass
class LoadedModel:
    """A trained model ready for inference: the core with its weights, the prompt builder of its LMM, the
    config it was built from (on this machine) and the config the checkpoint stores."""

    core: FLMM
    prompt_builder: PromptBuilder
    config: DictConfig
    stored: dict[str, Any]


def load_model(
    path: str | Path,
    paths: DictConfig | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """The model core of checkpoint ``path`` (a ``.ckpt`` or a ``save_pretrained`` directory) for inference:
    the checkpoint read once, its config checked once and its inputs prepared once (``config_here``), the
    core built without a LightningModule and its trainable weights checked, then loaded."""
    contents = read_checkpoint(path)
    config = config_here(contents, paths, overrides)
    core = build_core(config)
    try:
        core.load_trainable_state_dict(core_state_dict(contents.state_dict))
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{path}: {error}") from None
    return LoadedModel(core, instantiate(config.model.prompt), config, contents.stored)


@dataclass
class LoadedModule:
    """A trained model in its LightningModule, for an evaluation loop; ``config`` and ``stored`` as in
    ``LoadedModel``."""

    module: FLMMModule
    prompt_builder: PromptBuilder
    config: DictConfig
    stored: dict[str, Any]


def module_from_checkpoint(
    path: str | Path,
    paths: DictConfig | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> LoadedModule:
    """The LightningModule of checkpoint ``path`` with its trainable weights (read, checked and prepared once,
    as in ``load_model``)."""
    contents = read_checkpoint(path)
    config = config_here(contents, paths, overrides)
    module = instantiate_module(config)
    try:
        module.load_checkpoint_weights(contents.state_dict)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{path}: {error}") from None
    return LoadedModule(module, instantiate(config.model.prompt), config, contents.stored)
