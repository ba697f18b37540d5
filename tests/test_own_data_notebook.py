"""notebooks/own_data.ipynb (the own-data guide's walk-through) runs top to bottom and is stored without
outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from test_notebook import run_notebook

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "own_data.ipynb"


def test_own_data_notebook_is_stored_without_outputs() -> None:
    for cell in nbformat.read(NOTEBOOK, as_version=4).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.slow
def test_own_data_notebook_runs(tmp_path: Path, fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = run_notebook(NOTEBOOK, tmp_path, fixtures_dir, monkeypatch)
    printed = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "wrote 2 records (8 objects)" in printed and "OK: every record is good" in printed
    assert "fine-tuning from the weights of" in printed
    images = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) == 1  # the predicted masks
    work = tmp_path / "work"
    for run in ("run", "finetune"):
        assert (work / run / "checkpoints" / "last.ckpt").is_file()
    assert (work / "eval" / "metrics.json").is_file()
