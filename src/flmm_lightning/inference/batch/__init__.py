"""Batch prediction over a dataset: a manifest of inputs (``manifest``), decoded and encoded in workers and
batched as in evaluation (``dataset``), grounded by the model core in ``trainer.predict`` (``predictor``),
written resumably one line per input (``output``), on one device or many (``run``)."""

from flmm_lightning.inference.batch.manifest import ManifestEntry, ManifestError, read_manifest
from flmm_lightning.inference.batch.output import OutputMismatchError, PredictionOutput
from flmm_lightning.inference.batch.predictor import BatchPredictor
from flmm_lightning.inference.batch.run import BatchSummary, predict_batch

__all__ = [
    "BatchPredictor",
    "BatchSummary",
    "ManifestEntry",
    "ManifestError",
    "OutputMismatchError",
    "PredictionOutput",
    "predict_batch",
    "read_manifest",
]
