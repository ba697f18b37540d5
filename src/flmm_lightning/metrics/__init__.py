"""torchmetrics metrics of the grounding benchmarks: RefCOCO masks and boxes, PNG average recall."""

from flmm_lightning.metrics.boxes import BoxIoUMetric
from flmm_lightning.metrics.panoptic import PanopticNarrativeRecall
from flmm_lightning.metrics.referring import ReferringSegmentationMetric
from flmm_lightning.metrics.split import SPLIT_KINDS, SplitMetrics

__all__ = [
    "SPLIT_KINDS",
    "BoxIoUMetric",
    "PanopticNarrativeRecall",
    "ReferringSegmentationMetric",
    "SplitMetrics",
]
