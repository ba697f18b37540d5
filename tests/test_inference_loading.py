"""Loading a checkpoint for inference builds the model core alone: the file read once, its stored config
checked once, its inputs prepared once, and no LightningModule built on the way."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
import torch
from lightning import LightningModule

from flmm_lightning.config import composition, stored
from flmm_lightning.core import FLMM
from flmm_lightning.inference.grounder import Grounder
from flmm_lightning.runs import build, checkpoints
from flmm_lightning.runs.checkpoints import load_model, module_from_checkpoint

pytestmark = pytest.mark.usefixtures("pinned_threads")


def counted_loading(path: Path) -> tuple[Grounder, Counter[str]]:
    """``Grounder.from_checkpoint(path)`` with the steps of loading counted (each still runs as it does)."""
    calls: Counter[str] = Counter()
    real_load = torch.load

    def torch_load(source, *args, **kwargs):
        if Path(source) == path:
            calls["read"] += 1
        return real_load(source, *args, **kwargs)

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    real_init = LightningModule.__init__

    def lightning_init(self, *args, **kwargs):
        calls["LightningModule"] += 1
        real_init(self, *args, **kwargs)

    with (
        mock.patch.object(torch, "load", torch_load),
        mock.patch.object(checkpoints, "parse_stored_config", counting("check", stored.parse_stored_config)),
        mock.patch.object(composition, "parse_stored_config", counting("check", stored.parse_stored_config)),
        mock.patch.object(
            checkpoints, "prepare_stored_assets", counting("prepare", composition.prepare_stored_assets)
        ),
        mock.patch.object(composition, "prepare_inputs", counting("prepare", composition.prepare_inputs)),
        mock.patch.object(build, "prepare_inputs", counting("prepare", composition.prepare_inputs)),
        mock.patch.object(LightningModule, "__init__", lightning_init),
    ):
        grounder = Grounder.from_checkpoint(path, device="cpu")
    return grounder, calls


def test_a_checkpoint_is_read_checked_and_prepared_once_into_the_core_alone(tiny_checkpoint: Path) -> None:
    grounder, calls = counted_loading(tiny_checkpoint)
    assert calls == Counter({"read": 1, "check": 1, "prepare": 1})  # no LightningModule built
    assert type(grounder.model) is FLMM


def test_the_core_loaded_for_inference_equals_the_evaluation_modules_core(tiny_checkpoint: Path) -> None:
    """The same trainable weights and inference settings whether the checkpoint is loaded for inference (the
    core alone) or for an evaluation loop (inside the LightningModule)."""
    core = load_model(tiny_checkpoint).core
    module_core = module_from_checkpoint(tiny_checkpoint).module.model
    ours, theirs = core.trainable_state_dict(), module_core.trainable_state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert core.eval_heads_fp32 == module_core.eval_heads_fp32
