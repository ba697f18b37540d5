"""torchmetrics metrics of the benchmarks: RefCOCO masks and boxes, PNG average recall, ReasonSeg IoUs."""

from flmm_lightning.metrics.boxes import BoxIoUMetric
from flmm_lightning.metrics.panoptic import PanopticNarrativeRecall
from flmm_lightning.metrics.reasonseg import ReasonSegMetric
from flmm_lightning.metrics.referring import ReferringSegmentationMetric

__all__ = ["BoxIoUMetric", "PanopticNarrativeRecall", "ReasonSegMetric", "ReferringSegmentationMetric"]
