"""Every figure of one evaluation split, from the fine (SAM) and coarse (U-Net) masks of its objects."""

from __future__ import annotations

from torch import Tensor, nn
from torchmetrics import Metric

from flmm_lightning.metrics.boxes import BoxIoUMetric
from flmm_lightning.metrics.keywords import KeywordSelectionMetric
from flmm_lightning.metrics.panoptic import PanopticNarrativeRecall
from flmm_lightning.metrics.reasonseg import ReasonSegMetric
from flmm_lightning.metrics.referring import ReferringSegmentationMetric

# "res": referring expression segmentation (RefCOCO family); "png": panoptic narrative grounding;
# "reasonseg": reasoning segmentation (one generated answer per query).
SPLIT_KINDS: tuple[str, ...] = ("res", "png", "reasonseg")


class SplitMetrics(nn.Module):
    """The metrics of one split: the benchmark's own figures on the fine masks, and box and coarse figures.

    ``compute()`` returns, for ``"res"`` and ``"png"``:

    - the fine masks' benchmark figures: ``cIoU``, ``mIoU``, ``Pr@t`` (``"res"``) or ``AR*``, ``Acc@0.5``,
      ``pixel_acc`` (``"png"``);
    - ``box_mIoU``, ``box_Acc@0.5``: :class:`BoxIoUMetric` on the fine masks;
    - ``coarse_cIoU``, ``coarse_mIoU``: the U-Net's masks before SAM (how much the refiner adds);
    - ``coarse_box_mIoU``, ``coarse_box_Acc@0.5``: :class:`BoxIoUMetric` on the coarse masks, the seed
      analysis's coarse-stage evaluation (the box of a binarised coarse mask is also SAM's box prompt).

    For ``"reasonseg"``: :class:`ReasonSegMetric`'s ``gIoU``, ``cIoU`` and their ``_short`` / ``_long``
    subsets on the fine masks, and ``coarse_gIoU``, ``coarse_cIoU`` on the coarse ones, the benchmark's
    ``ignore`` pixels left out of both (the benchmark scores no boxes).

    With ``keyword_selection`` (narrative splits of a model with a keyword selector), ``selection`` is a
    :class:`KeywordSelectionMetric` that the caller updates, reported as ``selector_token_F1``,
    ``selector_phrase_F1`` etc.

    An empty mask has no box and scores box IoU 0 against a non-empty ground truth, for both stages. Every
    part is a torchmetrics ``Metric`` with summed state, so the figures are exact across DDP ranks; call
    ``compute()`` on every rank, then ``reset()``.
    """

    def __init__(self, kind: str, keyword_selection: bool = False) -> None:
        super().__init__()
        if kind not in SPLIT_KINDS:
            raise ValueError(f"split kind must be one of {SPLIT_KINDS}, got {kind!r}")
        self.kind = kind
        self.fine: Metric
        self.coarse: Metric
        if kind == "reasonseg":
            self.fine, self.coarse = ReasonSegMetric(), ReasonSegMetric()
            self.fine_box = self.coarse_box = None
        else:
            self.fine = PanopticNarrativeRecall() if kind == "png" else ReferringSegmentationMetric()
            self.coarse = ReferringSegmentationMetric()
            self.fine_box, self.coarse_box = BoxIoUMetric(), BoxIoUMetric()
        self.selection = KeywordSelectionMetric() if keyword_selection else None

    def update(
        self,
        fine_masks: Tensor,
        coarse_masks: Tensor,
        gt_masks: Tensor,
        is_thing: Tensor,
        is_plural: Tensor,
        is_sentence: Tensor | None = None,
        ignore_masks: Tensor | None = None,
    ) -> None:
        """Boolean ``[n, H, W]`` masks of one image's objects (the coarse ones already at the image's size)
        and their boolean ``[n]`` flags: ``is_thing`` / ``is_plural`` read by PNG splits, ``is_sentence``
        (required) and ``ignore_masks`` (``[n, H, W]``, optional) by ReasonSeg splits."""
        if self.kind == "reasonseg":
            if is_sentence is None:
                raise ValueError("a reasonseg split's update needs is_sentence (one flag per query)")
            self.fine.update(fine_masks, gt_masks, is_sentence, ignore_masks)
            self.coarse.update(coarse_masks, gt_masks, is_sentence, ignore_masks)
            return
        if self.kind == "png":
            self.fine.update(fine_masks, gt_masks, is_thing, is_plural)
        else:
            self.fine.update(fine_masks, gt_masks)
        self.fine_box.update(fine_masks, gt_masks)
        self.coarse.update(coarse_masks, gt_masks)
        self.coarse_box.update(coarse_masks, gt_masks)

    def compute(self) -> dict[str, float]:
        result = dict(self.fine.compute())
        coarse = self.coarse.compute()
        if self.kind == "reasonseg":
            result.update({f"coarse_{name}": coarse[name] for name in ("gIoU", "cIoU")})
            return result
        result.update(self.fine_box.compute())
        result.update({f"coarse_{name}": coarse[name] for name in ("cIoU", "mIoU")})
        result.update({f"coarse_{name}": value for name, value in self.coarse_box.compute().items()})
        if self.selection is not None:
            result.update({f"selector_{name}": value for name, value in self.selection.compute().items()})
        return result

    def reset(self) -> None:
        for metric in (self.fine, self.fine_box, self.coarse, self.coarse_box, self.selection):
            if metric is not None:
                metric.reset()
