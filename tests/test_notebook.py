"""notebooks/quickstart.ipynb runs top to bottom on the venv's kernel and is kept in git without outputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
KERNEL = "flmm-test-venv"


def stored_versions() -> dict[str, str]:
    """The notebook as committed (HEAD), as staged (the index) and in the working tree, where they exist."""
    versions = {"working tree": NOTEBOOK.read_text()}
    if shutil.which("git") is None:
        return versions
    root = NOTEBOOK.parents[1]
    relative = NOTEBOOK.relative_to(root).as_posix()
    for label, spec in (("HEAD", f"HEAD:{relative}"), ("index", f":{relative}")):
        shown = subprocess.run(["git", "show", spec], cwd=root, capture_output=True, text=True)
        if shown.returncode == 0:
            versions[label] = shown.stdout
    return versions


@pytest.mark.parametrize("label", ["working tree", "HEAD", "index"])
def test_notebook_is_stored_without_outputs(label: str) -> None:
    versions = stored_versions()
    if label not in versions:
        pytest.skip(f"notebook not in git's {label} yet")
    notebook = nbformat.reads(versions[label], as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def install_kernel(folder: Path) -> None:
    """A kernel spec that runs this interpreter (the venv's), found first through JUPYTER_PATH."""
    spec_dir = folder / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "flmm-lightning venv",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


def run_notebook(
    path: Path, tmp_path: Path, fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> nbformat.NotebookNode:
    """``path`` executed top to bottom on this interpreter's kernel (its work folder under ``tmp_path``, the
    fixtures from ``fixtures_dir``); fails on an error output or on a kernel that runs another interpreter.
    Returns the executed cells."""
    install_kernel(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("FLMM_NOTEBOOK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("FLMM_FIXTURES_DIR", str(fixtures_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # one intra-op thread: on a small shared machine, spinning OpenMP threads cost more than they give
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(
        notebook, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    assert notebook.cells.pop().outputs[0]["text"].strip() == sys.executable
    return notebook


@pytest.mark.slow
def test_quickstart_notebook_runs(
    tmp_path: Path, fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notebook = run_notebook(NOTEBOOK, tmp_path, fixtures_dir, monkeypatch)
    images = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 2  # the mask overlay and the layers x heads attention grid
    assert (tmp_path / "work" / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "work" / "run" / "metrics.json").is_file()
