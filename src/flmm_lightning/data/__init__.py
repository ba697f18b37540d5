"""Datasets (RefCOCO family, Panoptic Narrative Grounding, synthetic shapes) and the sample type."""

from flmm_lightning.data.bad_samples import BadSampleError, BadSampleReason, BadSampleSummary
from flmm_lightning.data.images import load_rgb_image
from flmm_lightning.data.png import PNGDataset
from flmm_lightning.data.refcoco import RefCocoDataset
from flmm_lightning.data.safe_pickle import UnsafePickleError, load_refs
from flmm_lightning.data.sample import NOT_GROUNDED, GroundingSample, SkippedSample
from flmm_lightning.data.synthetic import SyntheticPaths, write_synthetic_dataset

__all__ = [
    "NOT_GROUNDED",
    "BadSampleError",
    "BadSampleReason",
    "BadSampleSummary",
    "GroundingSample",
    "PNGDataset",
    "RefCocoDataset",
    "SkippedSample",
    "SyntheticPaths",
    "UnsafePickleError",
    "load_refs",
    "load_rgb_image",
    "write_synthetic_dataset",
]
