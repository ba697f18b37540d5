"""torchmetrics metrics of the benchmarks: RefCOCO masks and boxes, PNG average recall, ReasonSeg IoUs, and
the keyword selection of phrases to ground."""

from flmm_lightning.metrics.boxes import BoxIoUMetric
from flmm_lightning.metrics.keywords import KeywordSelectionMetric
from flmm_lightning.metrics.panoptic import PanopticNarrativeRecall
from flmm_lightning.metrics.reasonseg import ReasonSegMetric
from flmm_lightning.metrics.referring import ReferringSegmentationMetric
from flmm_lightning.metrics.split import SPLIT_KINDS, SplitMetrics

__all__ = [
    "SPLIT_KINDS",
    "BoxIoUMetric",
    "KeywordSelectionMetric",
    "PanopticNarrativeRecall",
    "ReasonSegMetric",
    "ReferringSegmentationMetric",
    "SplitMetrics",
]
