"""The output folder of a batch prediction: ``predictions.jsonl`` (one line per input, in input order),
the shards the ranks append to while running, the overlays, and ``run.json`` (which checkpoint and
manifest the lines belong to).

Each rank appends whole lines to its own shard and flushes after every batch, so a crash or Ctrl-C loses
at most the batch in flight. Folding the shards into ``predictions.jsonl`` (``consolidate``) keeps every
complete line, drops a trailing half-written one, keeps one line per input (the newest), orders them as
the manifest does and replaces the file atomically. A resumed run skips every input with a prediction
line; an input that failed is tried again.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from flmm_lightning.outputs.documents import finite_values

PREDICTIONS = "predictions.jsonl"
RUN_RECORD = "run.json"
OVERLAYS = "overlays"
_SHARD_PATTERN = "predictions.rank*.part.jsonl"


class OutputMismatchError(ValueError):
    """An output folder that holds the predictions of another checkpoint or manifest."""


@dataclass
class InputResult:
    """One output line (``record``) and, when overlays are on, the picture of its masks."""

    record: dict[str, Any]
    overlay: Image.Image | None = None


def prediction_line(record: Mapping[str, Any]) -> str:
    """One line of ``predictions.jsonl``: valid JSON, a non-finite number written as null with a notice."""
    cleaned, places = finite_values(dict(record))
    if places:
        cleaned["notices"] = [
            *cleaned.get("notices", []),
            *(f"{place} was not a finite number (NaN or infinity): written as null" for place in places),
        ]
    return json.dumps(cleaned, ensure_ascii=False, allow_nan=False) + "\n"


@dataclass(frozen=True)
class OutputLine:
    """One input's line as written (its text without the newline; kept as text, not parsed, so that the
    lines of a large run fit in memory) and whether it reports a failure."""

    text: str
    failed: bool


def complete_lines(path: Path) -> Iterator[tuple[str, OutputLine]]:
    """``(id, line)`` of every complete line of ``path``, read line by line; a trailing line without its
    newline (a write cut short) and a line that is not a JSON object with an id are left out (warned)."""
    try:
        file = path.open(encoding="utf-8", errors="replace")
    except FileNotFoundError:  # none yet, or a shard that global rank 0 has just folded in
        return
    with file:
        for number, line in enumerate(file, start=1):
            if not line.endswith("\n"):
                warnings.warn(
                    f"{path}: dropped a half-written last line (the run was cut short)", stacklevel=2
                )
                return
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and "id" in record:
                yield str(record["id"]), OutputLine(line[:-1], "error" in record)
            elif line.strip():
                warnings.warn(f"{path} line {number}: not a prediction line, left out", stacklevel=2)


class PredictionOutput:
    """The output folder; ``order`` maps each input id of the manifest to its position."""

    def __init__(self, folder: str | Path, order: Mapping[str, int]) -> None:
        self.folder = Path(folder)
        self.order = dict(order)

    @property
    def predictions(self) -> Path:
        return self.folder / PREDICTIONS

    def shard(self, rank: int) -> Path:
        return self.folder / f"predictions.rank{rank}.part.jsonl"

    def overlay_path(self, entry_id: str) -> Path:
        """The overlay of input ``entry_id``: its id made a safe file name."""
        return self.folder / OVERLAYS / (re.sub(r"[^A-Za-z0-9._-]+", "_", entry_id).strip("._") + ".png")

    def claim(self, identity: Mapping[str, str]) -> None:
        """Refuses a folder written for another checkpoint or manifest (its lines would mix two runs);
        records ``identity`` in a new one."""
        record = self.folder / RUN_RECORD
        if record.is_file():
            stored = json.loads(record.read_text())
            changed = [
                f"{key}: {stored.get(key)} there, {value} now"
                for key, value in identity.items()
                if stored.get(key) != value
            ]
            if changed:
                raise OutputMismatchError(
                    f"output={self.folder} holds the predictions of another run ({'; '.join(changed)}): "
                    "choose another output= folder, or remove it to start over"
                )
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(dict(identity), indent=2) + "\n")

    def lines(self) -> dict[str, OutputLine]:
        """Every input's newest line, from ``predictions.jsonl`` and the shards, by id."""
        by_id: dict[str, OutputLine] = {}
        for path in [self.predictions, *sorted(self.folder.glob(_SHARD_PATTERN))]:
            by_id.update(complete_lines(path))
        return by_id

    def completed_ids(self) -> set[str]:
        """Inputs with a prediction line (an error line does not count: the input is tried again)."""
        return {entry_id for entry_id, line in self.lines().items() if not line.failed}

    def consolidate(self) -> dict[str, OutputLine]:
        """Folds the shards into ``predictions.jsonl`` in manifest order (inputs the manifest no longer
        names go last, kept); returns the lines by id. One process at a time (global rank 0)."""
        lines = self.lines()
        shards = sorted(self.folder.glob(_SHARD_PATTERN))
        if not shards and self.predictions.is_file():
            return lines
        ordered = sorted(lines, key=lambda entry_id: (self.order.get(entry_id, len(self.order)), entry_id))
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.predictions.with_suffix(".jsonl.tmp")
        with temporary.open("w", encoding="utf-8") as file:
            file.writelines(lines[entry_id].text + "\n" for entry_id in ordered)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.predictions)
        for shard in shards:
            shard.unlink()
        return lines


class PredictionWriter(BasePredictionWriter):
    """Appends each batch's lines to this rank's shard (whole lines, flushed) and saves its overlays."""

    def __init__(self, output: PredictionOutput) -> None:
        super().__init__(write_interval="batch")
        self.output = output
        self._file = None

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Sequence[InputResult],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        for result in prediction:
            if result.overlay is not None:
                path = self.output.overlay_path(str(result.record["id"]))
                path.parent.mkdir(parents=True, exist_ok=True)
                result.overlay.save(path)
        if self._file is None:
            self._file = self.output.shard(trainer.global_rank).open("a", encoding="utf-8")
        self._file.write("".join(prediction_line(r.record) for r in prediction))
        self._file.flush()

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
