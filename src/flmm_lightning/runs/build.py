"""Building the model, the datamodule and the Lightning plumbing from a composed Hydra config."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from flmm_lightning.assets.synthetic_data import write_synthetic_dataset
from flmm_lightning.boundaries import PromptBuilder
from flmm_lightning.config.composition import prepare_inputs, stored_config
from flmm_lightning.config.data_schema import DATASET_GROUPS, INTERPOLATION_HELPERS, check_data_config
from flmm_lightning.config.errors import ConfigError
from flmm_lightning.config.stored import parse_stored_config
from flmm_lightning.core import FLMM
from flmm_lightning.data.datamodule import GroundingDataModule
from flmm_lightning.outputs.reporting import read_metrics_json
from flmm_lightning.training.evaluation import SplitEvaluation
from flmm_lightning.training.module import FLMMModule

# The parts of a run's config that define the model; stored in every checkpoint.
MODEL_KEYS = ("model", "sam", "module")
# The module settings that change what the core computes at inference.
INFERENCE_SETTINGS = ("eval_heads_fp32",)


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The model-defining config a checkpoint stores: plain data (``config.composition.stored_config``:
    resolved, paths as ``${paths.*}`` placeholders), checked now against the schema a loader checks it with
    (``config.stored``), so that a run whose checkpoints could not be loaded stops before it trains.

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


def build_module(config: dict[str, Any] | DictConfig) -> FLMMModule:
    """The LightningModule a composed config names, its generated inputs (tiny assets) built first."""
    config = OmegaConf.create(config) if not OmegaConf.is_config(config) else config
    prepare_inputs(config.model, config.sam)
    return instantiate_module(config)


def instantiate_module(config: DictConfig) -> FLMMModule:
    """The LightningModule of a config whose inputs exist (``build_module`` builds them first)."""
    return instantiate(config.module, lmm=instantiate(config.model.lmm), sam=instantiate(config.sam.refiner))


def build_core(config: DictConfig) -> FLMM:
    """The model core alone, for inference: the LMM, SAM and the mask head that the module settings describe,
    without the training shell (optimizer, schedule, metrics) ``instantiate_module`` adds. The config's
    inputs must exist. Loss weights are left at the core's defaults: inference computes no loss."""
    lmm = instantiate(config.model.lmm)
    mask_head = instantiate(config.module.mask_head)(lmm.attention_channels)
    settings = {key: config.module[key] for key in INFERENCE_SETTINGS if key in config.module}
    return FLMM(lmm, instantiate(config.sam.refiner), mask_head, **settings)


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


def test_results(module: SplitEvaluation, metrics_path: Path) -> dict[str, dict[str, float]]:
    """The metrics of the last test loop. With ``ddp_spawn`` that loop ran in worker processes and this
    process's module never saw them: they come back through the ``metrics.json`` that global rank 0 wrote
    (``training.callbacks.MetricsJsonWriter``)."""
    computed = getattr(module, "last_results", None)
    return dict(computed) if computed else read_metrics_json(metrics_path)


def finish_wandb() -> None:
    """Closes this process's W&B run, if one is open: its files are complete when the entry point returns, and
    a next run in the same process (a notebook, the tests) starts its own run instead of appending to this one
    (``WandbLogger`` reuses a run in progress). W&B is looked up, not imported: a run that never logged to it
    has not loaded it."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
