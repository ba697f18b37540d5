"""The rooms depend one way: ``lint-imports`` (import-linter) checks the contracts of pyproject.toml."""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import flmm_lightning

SOURCE = Path(flmm_lightning.__file__).resolve().parent  # the package these tests import
REPO = Path(__file__).resolve().parents[1]
ROOMS = ("flmm_lightning.data", "flmm_lightning.lmm", "flmm_lightning.heads", "flmm_lightning.metrics")


def lint_imports(source_root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` of this interpreter's environment on the package under ``source_root``."""
    executable = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source_root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [str(executable), "--no-cache", "--config", str(REPO / "pyproject.toml")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_contracts_state_the_layering() -> None:
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = {contract["id"]: contract for contract in settings["contracts"]}
    assert set(contracts) == {"layers", "boundaries-leaf", "no-test-assets"}
    layers = contracts["layers"]["layers"]
    assert layers[-1] == "flmm_lightning.boundaries"
    # the rooms share one layer as independent modules ("|"), below the core and above the shared helpers
    independent = [sorted(part.strip() for part in layer.split("|")) for layer in layers if "|" in layer]
    assert independent == [sorted(ROOMS)]
    assert layers.index("flmm_lightning.core") < layers.index(" | ".join(ROOMS))
    assert contracts["no-test-assets"]["forbidden_modules"] == ["flmm_lightning.assets"]
    assert set(ROOMS) <= set(contracts["no-test-assets"]["source_modules"])


def layered_modules() -> set[str]:
    """Every module or package the layers contract names."""
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [contract["layers"] for contract in settings["contracts"] if contract["id"] == "layers"]
    return {name.strip() for layer in layers for name in layer.replace("|", ":").split(":")}


def test_every_module_of_the_package_is_in_a_layer() -> None:
    """A module in no layer is checked by no contract; a package counts when it or each of its modules is
    named (``inference`` spans layers: ``Grounder`` above the builders, its pipeline below training's
    reasoning evaluator and above the LightningModule)."""
    named = layered_modules()
    missing = []
    for module in pkgutil.iter_modules([str(SOURCE)]):
        name = f"flmm_lightning.{module.name}"
        if name in named:
            continue
        inner = [f"{name}.{m.name}" for m in pkgutil.iter_modules([str(SOURCE / module.name)])]
        if not module.ispkg or not inner or not set(inner) <= named:
            missing.append(name)
    assert missing == []


def test_the_inference_pipeline_lies_between_the_reasoning_evaluator_and_the_lightning_module() -> None:
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [contract["layers"] for contract in settings["contracts"] if contract["id"] == "layers"]

    def layer_of(module: str) -> int:
        return next(i for i, layer in enumerate(layers) if module in layer.replace("|", ":").split(" : "))

    assert layer_of("flmm_lightning.inference.grounder") < layer_of("flmm_lightning.runs.build")
    evaluator = layer_of("flmm_lightning.training.reasoning_eval")
    reasoning = layer_of("flmm_lightning.inference.reasoning")
    conversation = layer_of("flmm_lightning.inference.conversation")
    pipeline = layer_of("flmm_lightning.inference.pipeline")
    module, core = layer_of("flmm_lightning.training.module"), layer_of("flmm_lightning.core")
    assert evaluator < reasoning < conversation < pipeline < module < core
    # every inference module lies above the LightningModule: it may import none of them
    inference = [name for name in layered_modules() if name.startswith("flmm_lightning.inference.")]
    assert inference and all(layer_of(name) < module for name in inference)


def test_the_package_keeps_every_contract() -> None:
    result = lint_imports(SOURCE.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_data_importing_lmm_breaks_the_layers_contract(tmp_path: Path) -> None:
    copy = tmp_path / "src" / "flmm_lightning"
    shutil.copytree(SOURCE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    batch = copy / "data" / "batch.py"
    batch.write_text(batch.read_text() + "\nfrom flmm_lightning.lmm.hf import HFGroundingAdapter  # noqa\n")
    result = lint_imports(copy.parent)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "flmm_lightning.data.batch -> flmm_lightning.lmm.hf" in result.stdout


def test_the_core_importing_the_inference_package_breaks_the_layers_contract(tmp_path: Path) -> None:
    copy = tmp_path / "src" / "flmm_lightning"
    shutil.copytree(SOURCE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    core = copy / "core.py"
    core.write_text(
        core.read_text() + "\nfrom flmm_lightning.inference.reasoning import reason_and_segment  # noqa\n"
    )
    result = lint_imports(copy.parent)
    assert result.returncode != 0
    assert "flmm_lightning.core -> flmm_lightning.inference.reasoning" in result.stdout


def test_the_lightning_module_importing_the_inference_pipeline_breaks_the_layers_contract(
    tmp_path: Path,
) -> None:
    copy = tmp_path / "src" / "flmm_lightning"
    shutil.copytree(SOURCE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    module = copy / "training" / "module.py"
    module.write_text(
        module.read_text() + "\nfrom flmm_lightning.inference.pipeline import GroundingRunner  # noqa\n"
    )
    result = lint_imports(copy.parent)
    assert result.returncode != 0
    assert "flmm_lightning.training.module -> flmm_lightning.inference.pipeline" in result.stdout
