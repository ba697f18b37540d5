"""Building the module, the datamodule and the Lightning plumbing from a Hydra config or a checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning import Callback, Trainer
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from flmm_lightning.boundaries import PromptBuilder
from flmm_lightning.config import (
    check_input_files,
    config_on_this_machine,
    prepare_inputs,
    prepare_stored_assets,
    stored_config,
)
from flmm_lightning.core import CheckpointMismatchError
from flmm_lightning.data.datamodule import GroundingDataModule
from flmm_lightning.data.schema import DATASET_GROUPS, INTERPOLATION_HELPERS, DataConfig
from flmm_lightning.data.synthetic import write_synthetic_dataset
from flmm_lightning.model import FLMMModule
from flmm_lightning.pretrained import is_pretrained_dir, load_pretrained
from flmm_lightning.reporting import read_metrics_json
from flmm_lightning.safe_config import parse_stored_config

# The parts of a run's config that define the model; stored in every checkpoint.
MODEL_KEYS = ("model", "sam", "module")


class ConfigError(ValueError):
    """A config value that cannot work (names the config key)."""


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The model-defining config a checkpoint stores: plain data (``config.stored_config``: resolved, paths
    as ``${paths.*}`` placeholders), checked now against the schema a loader checks it with
    (``safe_config``), so that a run whose checkpoints could not be loaded stops before it trains.

    The SAM embedding cache and the LMM feature cache are this machine's choice, not part of the model: they
    are stored as off (a stored config never names a directory to write to) and ``trust_remote_code`` as off
    (the loader's command line decides)."""
    keys = [*MODEL_KEYS, "data"] if cfg.get("data") is not None else list(MODEL_KEYS)
    stored = stored_config(cfg, keys)
    if "refiner" in stored["sam"]:
        stored["sam"]["refiner"]["embedding_cache"] = None
    if stored.get("data") is not None and "feature_cache" in stored["data"]:
        stored["data"]["feature_cache"] = None
    stored["model"]["trust_remote_code"] = False
    if isinstance(stored["model"].get("lmm"), dict):
        stored["model"]["lmm"]["trust_remote_code"] = False
    return parse_stored_config(stored, "this run's config (as a checkpoint stores it)")


def build_module(
    config: dict[str, Any] | DictConfig, stored_config: dict[str, Any] | None = None
) -> FLMMModule:
    config = OmegaConf.create(config) if not OmegaConf.is_config(config) else config
    prepare_inputs(config.model, config.sam)
    lmm = instantiate(config.model.lmm)
    sam = instantiate(config.sam.refiner)
    module = instantiate(config.module, lmm=lmm, sam=sam)
    # Set after instantiation: Hydra would try to instantiate the ``_target_`` nodes inside it.
    module.run_config = stored_config or {}
    return module


def build_prompt_builder(config: dict[str, Any] | DictConfig) -> PromptBuilder:
    config = OmegaConf.create(config) if not OmegaConf.is_config(config) else config
    prepare_inputs(config.model)
    return instantiate(config.model.prompt)


def _instantiate_sets(data_cfg: DictConfig, group: str) -> dict[str, Any]:
    sets = {}
    for name, node in (data_cfg.get(group) or {}).items():
        try:
            sets[name] = instantiate(node)
        except InstantiationException as error:
            cause = error.__cause__ or error
            raise ConfigError(f"data.{group}.{name}: {cause}") from cause
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"data.{group}.{name}: {error}") from error
    return sets


def check_data_config(data_cfg: DictConfig) -> None:
    """Raises ``ConfigError`` naming a key of ``data_cfg`` that ``data.schema.DataConfig`` does not declare
    (a misspelling) or a value of the wrong type."""
    schema = OmegaConf.structured(DataConfig)
    try:
        # Resolving builds nothing (``prepare_inputs`` does); the dataset nodes' own keys are theirs to check.
        OmegaConf.merge(schema, OmegaConf.to_container(data_cfg, resolve=True))
    except OmegaConfBaseException as error:
        key = f"data.{error.full_key}" if error.full_key else "data"
        if isinstance(error, ConfigKeyError) and is_dataclass(error.object_type):
            known = ", ".join(field.name for field in fields(error.object_type))
            raise ConfigError(
                f"{key} is not a key of a data config (known there: {known}; see flmm_lightning.data.schema)"
            ) from None
        raise ConfigError(f"{key}: {str(error).splitlines()[0]}") from None


def build_datamodule(
    data_cfg: dict[str, Any] | DictConfig, prompt_builder: PromptBuilder, sam_image_size: int
) -> GroundingDataModule:
    """Checks ``data_cfg`` against ``data.schema``, builds what it names (``prepare_inputs``), then
    instantiates each dataset on its own so that an error names the config key that set it."""
    data_cfg = OmegaConf.create(data_cfg) if not OmegaConf.is_config(data_cfg) else data_cfg
    check_data_config(data_cfg)
    prepare_inputs(data_cfg)
    synthetic = data_cfg.get("synthetic")
    if synthetic is not None and synthetic.get("root"):
        # a stored data config names its synthetic dataset as data: written here when missing
        write_synthetic_dataset(synthetic.root, num_train=synthetic.num_train, num_val=synthetic.num_val)
    skipped = {"_target_", *DATASET_GROUPS, *INTERPOLATION_HELPERS}
    settings = {key: value for key, value in data_cfg.items() if key not in skipped}
    return GroundingDataModule(
        prompt_builder=prompt_builder,
        sam_image_size=sam_image_size,
        train_sets=_instantiate_sets(data_cfg, "train_sets"),
        val_sets=_instantiate_sets(data_cfg, "val_sets"),
        test_sets=_instantiate_sets(data_cfg, "test_sets"),
        **settings,
    )


def build_callbacks(cfg: DictConfig | None) -> list[Callback]:
    return [instantiate(node) for node in (cfg or {}).values() if node is not None and "_target_" in node]


def build_loggers(cfg: DictConfig | None) -> list[Logger]:
    return [instantiate(node) for node in (cfg or {}).values() if node is not None and "_target_" in node]


def output_dir_of(cfg: DictConfig) -> Path:
    """``paths.output_dir``: Hydra's run directory under the CLI; outside it (the compose API, a notebook)
    nothing sets it, and every path built on it would start with "None"."""
    try:
        value = cfg.paths.get("output_dir")
    except ValueError:  # ${hydra:...} without a Hydra context
        value = None
    if not value:
        raise ConfigError(
            "paths.output_dir is not set: outside `python -m flmm_lightning.<entry point>` (e.g. a config "
            "from hydra.compose) pass paths.output_dir=<folder>"
        )
    return Path(value)


def test_results(module: FLMMModule, metrics_path: Path) -> dict[str, dict[str, float]]:
    """The metrics of the last test loop. With ``ddp_spawn`` that loop ran in worker processes and this
    process's module never saw them: they come back through the ``metrics.json`` that global rank 0 wrote
    (``callbacks.MetricsJsonWriter``)."""
    computed = getattr(module, "last_results", None)
    return dict(computed) if computed else read_metrics_json(metrics_path)


def finish_wandb(trainer: Trainer) -> None:
    """Closes the W&B run of this process's ``WandbLogger``: its files are complete when the entry point
    returns, and a next run in the same process (a notebook, the tests) starts its own run instead of
    appending to this one (``WandbLogger`` reuses a run in progress)."""
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a checkpoint without executing anything it carries (``weights_only=True``) and without reading
    its tensors (``mmap=True``: a tensor is read from the file when used, after ``core.FLMM`` checked its
    shape and dtype; a compressed record, whose declared size the file need not hold, is refused). A
    directory is read as a ``save_pretrained`` one (``pretrained.load_pretrained``: safetensors and JSON)."""
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
    """The checkpoint's model config, checked by ``safe_config`` before anything may be built from it."""
    stored = checkpoint.get("flmm_config")
    if not isinstance(stored, dict) or any(key not in stored for key in MODEL_KEYS):
        raise ValueError(f"{path} was not written by flmm-lightning (no model config inside)")
    return parse_stored_config(stored, path)


def model_identity(config: DictConfig) -> dict[str, Any]:
    """What makes two runs the same model beyond tensor shapes: the LMM adapter (family), the model's name,
    its pretrained weights (the last path component: a hub id and a local copy of it agree) and the SAM
    variant. (Layers x heads are the U-Net's input channels: loading the weights compares those shapes.)
    ``config``: a model-defining config on this machine (``config.config_on_this_machine``), so values are
    compared resolved, however they are written (a tiny asset's resolver, ``${paths.*}``, another key)."""
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
    """A resume must continue the same model: the checkpoint's stored config must pass ``safe_config`` and
    name the LMM and SAM of this run (``config``: its ``run_config``), both read with this machine's
    ``paths`` (the defaults when None). Lightning then loads its state."""
    stored = _stored_config(load_checkpoint(path), path)
    mismatches = _identity_mismatches(stored, config, paths, path)
    if mismatches:
        raise CheckpointMismatchError(
            f"cannot resume from {path}: it was trained with another model ({'; '.join(mismatches)}). "
            "Resume with the checkpoint's own model and SAM, or start a new run."
        )


def _identity_mismatches(
    stored: dict[str, Any], config: dict[str, Any], paths: DictConfig | Mapping[str, Any] | None, path: Path
) -> list[str]:
    stored_identity = model_identity(config_on_this_machine(stored, paths, source=str(path)))
    identity = model_identity(config_on_this_machine(config, paths, source="this run"))
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
    mismatches = _identity_mismatches(_stored_config(load_checkpoint(path), path), config, paths, path)
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


def module_from_checkpoint(
    path: str | Path,
    paths: DictConfig | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[FLMMModule, DictConfig]:
    """Rebuilds the module from the config stored in the checkpoint and loads its trainable weights.

    The stored config is checked first (``safe_config``), then resolved on this machine
    (``config.config_on_this_machine``): ``paths`` (this machine's ``paths.*``; the defaults when None)
    and the command line's ``overrides`` of stored sections. Returns the module and that config."""
    checkpoint = load_checkpoint(path)
    stored = _stored_config(checkpoint, path)
    config = config_on_this_machine(stored, paths, overrides, source=str(path))
    # A tiny asset the stored config names is built here, as on the machine that trained it.
    prepare_stored_assets(stored, config)
    check_input_files(config, stored, source=str(path))
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict):
        raise CheckpointMismatchError(f"{path}: no state_dict of tensors inside")
    module = build_module(config, stored_config=stored)
    try:
        module.load_checkpoint_weights(state_dict)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{path}: {error}") from None
    return module, config
