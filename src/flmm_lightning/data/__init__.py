"""Datasets (RefCOCO family, Panoptic Narrative Grounding, ReasonSeg, your own data, synthetic shapes).

Their items are ``flmm_lightning.boundaries.GroundingSample``s. The bad-sample handling imports eagerly;
the datasets (which need pycocotools) load on first access, so that code which only batches samples (the
model, the benchmark) does not import them.
"""

from __future__ import annotations

import importlib
from typing import Any

from flmm_lightning.data.bad_samples import BadSampleError, BadSampleReason, BadSampleSummary

_LAZY = {
    "load_rgb_image": "flmm_lightning.data.images",
    "CustomDataset": "flmm_lightning.data.custom",
    "PNGDataset": "flmm_lightning.data.png",
    "ReasonSegDataset": "flmm_lightning.data.reasonseg",
    "reasoning_prompt": "flmm_lightning.data.reasonseg",
    "RefCocoDataset": "flmm_lightning.data.refcoco",
    "UnsafePickleError": "flmm_lightning.data.safe_pickle",
    "PickleLimitError": "flmm_lightning.data.safe_pickle",
    "RecordError": "flmm_lightning.data.records",
    "load_refs": "flmm_lightning.data.safe_pickle",
    "SyntheticPaths": "flmm_lightning.assets.synthetic_data",
    "write_synthetic_dataset": "flmm_lightning.assets.synthetic_data",
}

__all__ = [
    "BadSampleError",
    "BadSampleReason",
    "BadSampleSummary",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
