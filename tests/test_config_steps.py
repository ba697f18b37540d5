"""Composing and resolving a config has no side effects; ``prepare_inputs`` builds what it names; a data
config is checked against its schema, so that a misspelled key is an error naming it."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from flmm_lightning.assets.synthetic_data import synthetic_paths
from flmm_lightning.config.composition import CONF_DIR, prepare_inputs
from flmm_lightning.config.data_schema import (
    DATASET_GROUPS,
    INTERPOLATION_HELPERS,
    DataConfig,
    check_data_config,
)
from flmm_lightning.config.errors import ConfigError
from flmm_lightning.data.datamodule import GroundingDataModule
from flmm_lightning.runs.build import build_datamodule, build_prompt_builder


def files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


def demo_config(compose_config: Callable[..., DictConfig], root: Path, *extra: str) -> DictConfig:
    return compose_config(
        [
            "+experiment=demo",
            f"paths.cache_dir={root / 'cache'}",
            f"paths.data_dir={root / 'data'}",
            f"paths.output_dir={root / 'run'}",
            "data.synthetic.num_train=4",
            "data.synthetic.num_val=2",
            *extra,
        ]
    )


def test_resolving_the_demo_config_builds_nothing_and_prepare_builds_what_it_names(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = demo_config(compose_config, tmp_path)
    resolved = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key != "hydra"
    }
    assert files_under(tmp_path) == []

    built = prepare_inputs(cfg.model, cfg.sam, cfg.data)
    lmm, sam = Path(resolved["model"]["pretrained"]), Path(resolved["sam"]["refiner"]["sam"]["checkpoint"])
    synthetic_root = Path(resolved["data"]["synthetic"]["root"])
    assert built == [lmm, sam, synthetic_root]
    assert (lmm / "config.json").is_file() and sam.is_file()
    assert synthetic_paths(synthetic_root).refcoco_refs.is_file()
    assert lmm.parent == sam.parent.parent == tmp_path / "cache"

    before = files_under(tmp_path)
    prepare_inputs(cfg.model, cfg.sam, cfg.data)  # everything is there already: nothing is rebuilt
    assert [(path, path.stat().st_mtime_ns) for path in files_under(tmp_path) if path.is_file()] == [
        (path, path.stat().st_mtime_ns) for path in before if path.is_file()
    ]


def test_the_builders_prepare_what_they_instantiate(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = demo_config(compose_config, tmp_path, "data.num_workers=0")
    datamodule = build_datamodule(cfg.data, build_prompt_builder(cfg), cfg.sam.image_size)
    assert len(datamodule.train_sets["synthetic_refcoco_train"]) > 0
    assert (tmp_path / "cache" / "tiny_qwen2_5_vl").is_dir() and not (
        tmp_path / "cache" / "tiny_sam"
    ).exists()


def test_the_schema_declares_every_datamodule_setting() -> None:
    declared = {field.name for field in fields(DataConfig)}
    settings = set(inspect.signature(GroundingDataModule).parameters) - {"prompt_builder", "sam_image_size"}
    assert declared == {"_target_", *settings, *INTERPOLATION_HELPERS}
    assert set(DATASET_GROUPS) <= settings


@pytest.mark.parametrize("name", sorted(path.stem for path in (CONF_DIR / "data").glob("*.yaml")))
def test_every_data_config_passes_its_schema(name: str, compose_config: Callable[..., DictConfig]) -> None:
    check_data_config(compose_config([f"data={name}"]).data)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("+data.batchsize=8", "data.batchsize is not a key of a data config"),
        ("+data.eval_batch_sise=8", "data.eval_batch_sise is not a key of a data config"),
        ("+data.synthetic.num_trian=8", "data.synthetic.num_trian is not a key of a data config"),
        ("data.batch_size=eight", "data.batch_size: Value 'eight'"),
    ],
)
def test_a_misspelled_or_mistyped_data_key_is_an_error_naming_it(
    override: str, named: str, compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = demo_config(compose_config, tmp_path, override)
    with pytest.raises(ConfigError, match="^" + named.replace(".", r"\.").replace("'", "'")) as error:
        build_datamodule(cfg.data, build_prompt_builder(cfg), cfg.sam.image_size)
    if "not a key" in named:
        assert "batch_size" in str(error.value) or "num_train" in str(error.value)  # the keys it could be
    assert not (tmp_path / "data").exists()  # refused before anything was built
