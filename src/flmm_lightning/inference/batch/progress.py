"""The progress of a batch prediction in images: images/s and the time left, not batches."""

from __future__ import annotations

from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class ImagesProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar for ``trainer.predict``, counting the images of this rank (its total is this
    rank's share, ``BatchPredictionData.shard_size``), so that its rate reads images/s and its ETA follows
    from it."""

    def __init__(self) -> None:
        super().__init__()
        self._images = 0

    def init_predict_tqdm(self) -> Tqdm:
        bar = super().init_predict_tqdm()
        bar.unit = "img"
        return bar

    def on_predict_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        if batch_idx == 0 and self._predict_progress_bar is not None:
            self._images = 0
            self.predict_progress_bar.total = trainer.datamodule.shard_size
            self.predict_progress_bar.set_description("Predicting")

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._images += len(batch)
        bar = self._predict_progress_bar
        if bar is not None and not bar.disable:
            bar.n = self._images
            bar.refresh()
