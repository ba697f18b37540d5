"""Metric tables for people (rich) and for programs (metrics.json, per_object.csv)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flmm_lightning.common.files import atomic_write


def metrics_table(results: dict[str, dict[str, float]], title: str = "Metrics (%)") -> Table:
    """Rows are splits, columns the union of their metric names, values as percentages."""
    columns = list(dict.fromkeys(name for values in results.values() for name in values))
    table = Table(title=title)
    table.add_column("split", style="bold")
    for column in columns:
        table.add_column(column, justify="right")
    for split, values in results.items():
        cells = []
        for column in columns:
            value = values.get(column)
            cells.append("" if value is None else "nan" if math.isnan(value) else f"{100 * value:.2f}")
        table.add_row(split, *cells)
    return table


# Columns of the second table of each kind of split: the box figures, the coarse (U-Net) stage's and the
# keyword selector's.
SECONDARY_PREFIXES = ("box_", "coarse_", "selector_")


def print_metrics(results: dict[str, dict[str, float]], title: str = "Metrics (%)") -> None:
    """Per kind of split (referring / narrative) one table of its benchmark figures and one of its box and
    coarse-stage figures, so that each stays narrow enough to read."""
    groups: dict[tuple[str, ...], dict[str, dict[str, float]]] = {}
    for split, values in results.items():
        groups.setdefault(tuple(values), {})[split] = values
    for group in groups.values():
        main = {split: _columns(values, secondary=False) for split, values in group.items()}
        _print_table(metrics_table(main, title))
        secondary = {split: _columns(values, secondary=True) for split, values in group.items()}
        if any(secondary.values()):
            _print_table(metrics_table(secondary, f"{title}: boxes, coarse (U-Net) masks, keyword selector"))


def _print_table(table: Table) -> None:
    """On a terminal at least 160 columns wide; into a file or a pipe as wide as the table needs, so that no
    column is wrapped or cut (a redirected console would otherwise be 80 columns)."""
    console = Console()
    if console.is_terminal:
        console = Console(width=max(console.width, 160))
    else:
        console = Console(width=Console(width=1 << 16).measure(table).maximum)
    console.print(table)


def _columns(values: dict[str, float], secondary: bool) -> dict[str, float]:
    return {name: value for name, value in values.items() if name.startswith(SECONDARY_PREFIXES) == secondary}


def write_metrics_json(results: dict[str, dict[str, float]], path: str | Path) -> Path:
    """NaN (an empty subset) is written as null so that the file is strict JSON. Written atomically: a reader
    (the parent process under ``ddp_spawn``) sees the whole file or none."""
    path = Path(path)
    clean = {
        split: {name: None if math.isnan(value) else value for name, value in values.items()}
        for split, values in results.items()
    }
    with atomic_write(path) as handle:
        handle.write((json.dumps(clean, indent=2) + "\n").encode())
    return path


def read_metrics_json(path: str | Path) -> dict[str, dict[str, float]]:
    """The inverse of ``write_metrics_json`` (null back to NaN)."""
    data = json.loads(Path(path).read_text())
    return {
        split: {name: math.nan if value is None else float(value) for name, value in values.items()}
        for split, values in data.items()
    }


PER_OBJECT_FIELDS = (
    "split",
    "image_id",
    "file_name",
    "object_id",
    "phrase",
    "iou",
    "box_iou",
    "coarse_iou",
    "coarse_box_iou",
)


def write_per_object_csv(rows: list[dict[str, object]], path: str | Path) -> Path:
    """One row per evaluated object: split, image, phrase, mask IoU and box IoU of the fine and of the coarse
    masks (to find failures). Written atomically, as ``write_metrics_json``."""
    path = Path(path)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=PER_OBJECT_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path) as handle:
        handle.write(text.getvalue().encode())
    return path


def read_per_object_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``write_per_object_csv`` file, as text: written back unchanged."""
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))
