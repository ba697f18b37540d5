"""The rooms depend one way: ``lint-imports`` (import-linter) checks the contracts of pyproject.toml."""

from __future__ import annotations

import os
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
