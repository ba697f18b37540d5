"""A typo in a setting stops the run naming the key and the allowed values, before anything is built; eval and
predict refuse model overrides (the model comes from the checkpoint)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cli_exit import cli_exit
from omegaconf import DictConfig
from test_entrypoints import run_overrides

from flmm_lightning import chat as chat_entry
from flmm_lightning import eval as eval_entry
from flmm_lightning import predict as predict_entry
from flmm_lightning.app import __main__ as app_entry
from flmm_lightning.config.errors import ConfigError
from flmm_lightning.eval import evaluate
from flmm_lightning.train import train

# (override, the key and value the error names, one allowed value it lists)
TYPOS = [
    ("model.lmm.capture=fuse", "model.lmm.capture='fuse'", "fused"),
    ("model.lmm.merge=avg", "model.lmm.merge='avg'", "mean"),
    ("model.lmm.torch_dtype=fp16", "model.lmm.torch_dtype='fp16'", "bfloat16"),
    ("sam.refiner.encoder_attention=flash", "sam.refiner.encoder_attention='flash'", "sdpa"),
    (
        "data.train_sets.synthetic_refcoco_train.text_mode=once",
        "data.train_sets.synthetic_refcoco_train.text_mode='once'",
        "random_once",
    ),
    (
        "+data.val_sets.synthetic_png_val.on_bad_sample=ignore",
        "data.val_sets.synthetic_png_val.on_bad_sample='ignore'",
        "skip",
    ),
]


@pytest.mark.parametrize(("override", "named", "allowed"), TYPOS, ids=[typo[0] for typo in TYPOS])
def test_unknown_value_of_an_enumerated_training_setting_is_refused(
    override: str, named: str, allowed: str, compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_config(run_overrides(tmp_path / "data", run_dir, override))
    with pytest.raises(ConfigError) as error:
        train(cfg)
    assert named in str(error.value) and allowed in str(error.value)
    assert not run_dir.exists()  # refused before anything was written


def test_unknown_eval_stage_is_refused(compose_config: Callable[..., DictConfig], tmp_path: Path) -> None:
    """``stage=tset`` used to evaluate the test splits."""
    cfg = compose_config(
        [f"ckpt={tmp_path / 'missing.ckpt'}", "stage=tset", f"paths.output_dir={tmp_path}"],
        config_name="eval",
    )
    with pytest.raises(ConfigError, match=r"stage='tset': must be one of test, val"):
        evaluate(cfg)


@pytest.mark.parametrize("override", ["model=tiny_llava", "+model=tiny_llava", "sam=tiny", "+module.lr=1"])
@pytest.mark.parametrize(
    "entry", [eval_entry, predict_entry, chat_entry, app_entry], ids=["eval", "predict", "chat", "app"]
)
def test_the_cli_refuses_model_overrides(
    entry, override: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``model=`` used to fail with Hydra's "No match in the defaults list" and ``+model=`` to be ignored."""
    name = entry.__name__.rsplit(".", 1)[-1]
    argv = [name, f"ckpt={tmp_path / 'x.ckpt'}", f"hydra.run.dir={tmp_path / 'run'}", override]
    message = str(cli_exit(entry.main, argv, monkeypatch))
    assert f"`{override}`" in message and "come from the checkpoint" in message
    assert not (tmp_path / "run").exists()


def test_eval_from_a_composed_config_refuses_an_appended_model(
    compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = compose_config(
        [f"ckpt={tmp_path / 'x.ckpt'}", "+model=tiny_llava", f"paths.output_dir={tmp_path}"],
        config_name="eval",
    )
    with pytest.raises(ConfigError, match="come from the checkpoint"):
        evaluate(cfg)
