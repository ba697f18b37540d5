"""A checkpoint's stored config is checked before anything is built from it: a crafted checkpoint that passes
``torch.load(weights_only=True)`` must not open, write or delete a file through Hydra's ``instantiate``."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from omegaconf import DictConfig
from test_entrypoints import run_overrides
from test_reliability_resume import FAST, QUIET

from flmm_lightning.config.composition import CONF_DIR
from flmm_lightning.config.stored import ALLOWED_TARGETS, UnsafeConfigError, parse_stored_config
from flmm_lightning.eval import evaluate
from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.runs.checkpoints import load_checkpoint
from flmm_lightning.train import train

# A checkpoint after every step, nothing else written by callbacks.
ONE_CHECKPOINT = [
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "callbacks.mask_overlays=null",
    "callbacks.rich_progress_bar=null",
]
# The config groups a checkpoint stores (runs.build.run_config) and where the module config lives.
STORED_GROUPS = ("model", "sam", "data")


def targets_in(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["_target_"]} if isinstance(node.get("_target_"), str) else set()
        return found.union(*(targets_in(child) for child in node.values()))
    if isinstance(node, list):
        return set().union(*(targets_in(child) for child in node))
    return set()


def stored_section_targets() -> set[str]:
    """Every ``_target_`` that conf/ can put into a checkpoint's stored config."""
    found: set[str] = set()
    for group in STORED_GROUPS:
        for path in (CONF_DIR / group).rglob("*.yaml"):
            found |= targets_in(yaml.safe_load(path.read_text()))
    for path in [CONF_DIR / "train.yaml", *(CONF_DIR / "experiment").glob("*.yaml")]:
        config = yaml.safe_load(path.read_text()) or {}
        found |= targets_in({key: config.get(key) for key in ("module", *STORED_GROUPS)})
    return found


def test_the_allow_list_is_exactly_the_targets_of_the_stored_config_groups() -> None:
    used = stored_section_targets()
    assert used, "no targets found: the conf/ layout changed"
    assert used - ALLOWED_TARGETS == set(), "a conf/ target that eval could not rebuild from a checkpoint"
    assert ALLOWED_TARGETS - used == set(), "an allowed target that no conf/ file uses"


# ---- crafted checkpoints -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_checkpoint(compose_config: Callable[..., DictConfig], tmp_path_factory: pytest.TempPathFactory):
    """A real one-step demo checkpoint: crafted ones differ from it in one node."""
    data_dir, run_dir = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("run")
    overrides = run_overrides(data_dir, run_dir, *FAST, *QUIET, "trainer.max_steps=1", *ONE_CHECKPOINT)
    train(compose_config(overrides))
    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt")


def craft(checkpoint: dict[str, Any], key: str, node: Any, path: Path) -> Path:
    """``checkpoint`` with ``flmm_config.<key>`` replaced by ``node``, saved at ``path``."""
    crafted = copy.deepcopy(checkpoint)
    *parents, last = key.split(".")
    parent = crafted["flmm_config"]
    for part in parents:
        parent = parent.setdefault(part, {})
    parent[last] = node
    torch.save(crafted, path)
    torch.load(path, weights_only=True)  # as safe as the real one for torch.load
    return path


def open_for_writing(victim: Path) -> dict[str, Any]:
    return {"_target_": "builtins.open", "file": str(victim), "mode": "w"}


# name: (stored key, node builder, the key and target the error names, the victim's state before)
ATTACKS = {
    "optimizer": (
        "module.optimizer",
        open_for_writing,
        ("module.optimizer._target_", "builtins.open"),
        "absent",
    ),
    "nested_sam": (
        "sam.refiner.sam",
        lambda victim: {"_target_": "os.remove", "_args_": [str(victim)]},
        ("sam.refiner.sam._target_", "os.remove"),
        "file",
    ),
    "dataset": (
        "data.val_sets.x",
        lambda victim: {"_target_": "shutil.rmtree", "path": str(victim)},
        ("data.val_sets.x._target_", "shutil.rmtree"),
        "folder",
    ),
    "args_list": (
        "module.mask_head._args_",
        lambda victim: [open_for_writing(victim)],
        ("module.mask_head._args_", "a key the schema lacks"),
        "absent",
    ),
    "method": (
        "model.prompt",
        lambda victim: {"_target_": "pathlib.Path.write_text", "_args_": [str(victim), "x"]},
        ("model.prompt._target_", "pathlib.Path.write_text"),
        "absent",
    ),
    "resolver": (
        "model.lmm.pretrained",
        lambda victim: f"${{flmm_synthetic:{victim},1,1}}",
        ("model.lmm.pretrained", "flmm_synthetic"),
        "absent",
    ),
}


def victim_state(victim: Path) -> str:
    if victim.is_file():
        return "file"
    return "folder" if victim.is_dir() else "absent"


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_crafted_checkpoint_is_refused_by_eval_before_anything_is_built(
    attack: str,
    real_checkpoint: dict[str, Any],
    compose_config: Callable[..., DictConfig],
    tmp_path: Path,
) -> None:
    key, node, (named_key, named_target), before = ATTACKS[attack]
    victim = tmp_path / "victim"
    if before == "file":
        victim.write_text("keep me")
    elif before == "folder":
        victim.mkdir()
        (victim / "precious.txt").write_text("keep me")
    checkpoint = craft(real_checkpoint, key, node(victim), tmp_path / "crafted.ckpt")
    out = tmp_path / "eval"
    cfg = compose_config([f"ckpt={checkpoint}", f"paths.output_dir={out}"], config_name="eval")
    with pytest.raises(UnsafeConfigError) as error:
        evaluate(cfg)
    message = str(error.value)
    assert f"flmm_config.{named_key}" in message and named_target in message and str(checkpoint) in message
    assert victim_state(victim) == before
    if before != "absent":
        assert "keep me" in (
            victim.read_text() if before == "file" else (victim / "precious.txt").read_text()
        )


def test_crafted_checkpoint_is_refused_by_the_grounder(
    real_checkpoint: dict[str, Any], tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    checkpoint = craft(real_checkpoint, "model.lmm", open_for_writing(victim), tmp_path / "crafted.ckpt")
    with pytest.raises(UnsafeConfigError, match=r"flmm_config\.model\.lmm\._target_: 'builtins\.open'"):
        Grounder.from_checkpoint(checkpoint, device="cpu")
    assert not victim.exists()


def test_crafted_checkpoint_is_refused_by_a_training_resume(
    real_checkpoint: dict[str, Any], compose_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """Lightning would load the checkpoint's state; the stored config is checked before the run starts."""
    victim = tmp_path / "victim"
    checkpoint = craft(
        real_checkpoint, "module.optimizer", open_for_writing(victim), tmp_path / "crafted.ckpt"
    )
    run_dir = tmp_path / "resumed"
    overrides = run_overrides(tmp_path / "data", run_dir, *FAST, *QUIET, f"ckpt_path={checkpoint}")
    with pytest.raises(UnsafeConfigError, match=r"flmm_config\.module\.optimizer\._target_"):
        train(compose_config(overrides))
    assert not victim.exists()
    assert not (run_dir / "checkpoints").exists()


def test_the_real_stored_config_passes(real_checkpoint: dict[str, Any]) -> None:
    assert parse_stored_config(real_checkpoint["flmm_config"], "real.ckpt") == real_checkpoint["flmm_config"]
