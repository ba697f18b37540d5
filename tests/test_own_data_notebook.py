"""notebooks/own_data.ipynb (the own-data guide's walk-through) runs top to bottom and is stored without
outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell
from test_notebook import KERNEL, install_kernel

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "own_data.ipynb"


def test_own_data_notebook_is_stored_without_outputs() -> None:
    for cell in nbformat.read(NOTEBOOK, as_version=4).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.slow
def test_own_data_notebook_runs(tmp_path: Path, fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_kernel(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("FLMM_NOTEBOOK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("FLMM_FIXTURES_DIR", str(fixtures_dir))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    num_cells = len(notebook.cells)
    notebook.cells.append(new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(
        notebook, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    assert notebook.cells[-1].outputs[0]["text"].strip() == sys.executable
    printed = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "wrote 2 records (8 objects)" in printed and "OK: every record is good" in printed
    assert "fine-tuning from the weights of" in printed
    images = [
        output
        for cell in notebook.cells[:num_cells]
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 1  # the predicted masks
    work = tmp_path / "work"
    for run in ("run", "finetune"):
        assert (work / run / "checkpoints" / "last.ckpt").is_file()
    assert (work / "eval" / "metrics.json").is_file()
