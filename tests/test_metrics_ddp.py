"""Metrics synchronised across 2 gloo processes on CPU equal the single-process result on all data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gloo import results_of_gloo_ranks
from lightning import LightningModule, Trainer
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric

from flmm_lightning.data.sampler import UnpaddedDistributedSampler
from flmm_lightning.metrics import (
    BoxIoUMetric,
    PanopticNarrativeRecall,
    ReasonSegMetric,
    ReferringSegmentationMetric,
    SplitMetrics,
)


class MaskPairDataset(Dataset):
    """Item i: predicted (fine and coarse) and true masks of a few objects of one image, drawn from
    ``(seed, i)``."""

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = length
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        rng = np.random.default_rng((self.seed, index))
        n, h, w = int(rng.integers(1, 5)), int(rng.integers(4, 16)), int(rng.integers(4, 16))
        gt = rng.random((n, h, w)) < rng.uniform(0, 0.6, (n, 1, 1))
        # Flip a random share of the pixels so IoUs spread over [0, 1]; some objects come out empty.
        pred = gt ^ (rng.random((n, h, w)) < rng.uniform(0, 0.5, (n, 1, 1)))
        pred[0] &= rng.random() < 0.8
        coarse = gt ^ (rng.random((n, h, w)) < rng.uniform(0, 0.5, (n, 1, 1)))
        coarse[-1] &= rng.random() < 0.7
        is_plural = rng.random(n) < 0.3
        is_thing = is_plural | (rng.random(n) < 0.5)
        is_sentence = rng.random(n) < 0.5
        ignore = rng.random((n, h, w)) < rng.uniform(0, 0.3, (n, 1, 1))
        arrays = {"pred": pred, "coarse": coarse, "gt": gt, "is_thing": is_thing, "is_plural": is_plural}
        arrays |= {"is_sentence": is_sentence, "ignore": ignore}
        return {k: torch.from_numpy(v) for k, v in arrays.items()}


def make_metrics() -> dict[str, Metric | SplitMetrics]:
    return {
        "res": ReferringSegmentationMetric(),
        "rec": BoxIoUMetric(),
        "png": PanopticNarrativeRecall(),
        "reasonseg": ReasonSegMetric(),
        # what FLMMModule keeps per split: fine and coarse figures, boxes included
        "res_split": SplitMetrics("res"),
        "png_split": SplitMetrics("png"),
    }


def update_metrics(metrics: dict[str, Metric | SplitMetrics], item: dict[str, Tensor]) -> None:
    metrics["res"].update(item["pred"], item["gt"])
    metrics["rec"].update(item["pred"], item["gt"])
    metrics["png"].update(item["pred"], item["gt"], item["is_thing"], item["is_plural"])
    metrics["reasonseg"].update(item["pred"], item["gt"], item["is_sentence"], item["ignore"])
    for name in ("res_split", "png_split"):
        metrics[name].update(item["pred"], item["coarse"], item["gt"], item["is_thing"], item["is_plural"])


def compute_metrics(metrics: dict[str, Metric | SplitMetrics]) -> dict[str, float]:
    return {f"{name}/{k}": v for name, metric in metrics.items() for k, v in metric.compute().items()}


def single_process_result(length: int) -> dict[str, float]:
    dataset = MaskPairDataset(length)
    metrics = make_metrics()
    for index in range(len(dataset)):
        update_metrics(metrics, dataset[index])
    return compute_metrics(metrics)


# (dataset length, indices of rank 0, indices of rank 1); None = UnpaddedDistributedSampler's shards.
SCENARIOS: list[tuple[int, list[int] | None, list[int] | None]] = [
    (7, None, None),
    (7, [0, 1, 2, 3, 4, 5], [6]),
    (1, None, None),  # rank 1 gets nothing
]


def _metrics_of_rank(rank: int) -> list[dict[str, float]]:
    results = []
    for length, *shards in SCENARIOS:
        dataset = MaskPairDataset(length)
        indices = shards[rank] if shards[rank] is not None else UnpaddedDistributedSampler(dataset)
        metrics = make_metrics()
        for index in indices:
            update_metrics(metrics, dataset[index])
        results.append(compute_metrics(metrics))
    return results


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_metrics_sync_across_two_gloo_ranks(tmp_path: Path) -> None:
    expected = [single_process_result(length) for length, *_ in SCENARIOS]
    for results in results_of_gloo_ranks(_metrics_of_rank, tmp_path):
        for result, want in zip(results, expected, strict=True):
            assert result == pytest.approx(want, abs=1e-12, nan_ok=True)


class EvalModule(LightningModule):
    """Updates the metrics with the dataset's own predictions and logs them the recommended way."""

    def __init__(self, dataset_length: int, out_dir: str) -> None:
        super().__init__()
        self.dataset = MaskPairDataset(dataset_length)
        self.out_dir = out_dir
        self.val_metrics = torch.nn.ModuleDict(make_metrics())

    def val_dataloader(self) -> DataLoader:
        # Built after the process group exists, so the sampler picks up this rank.
        return DataLoader(self.dataset, batch_size=None, sampler=UnpaddedDistributedSampler(self.dataset))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        update_metrics(self.val_metrics, batch)

    def on_validation_epoch_end(self) -> None:
        results = {}
        for name, metric in self.val_metrics.items():
            # compute() all-gathers the state, so every rank logs the same global values.
            values = {f"{name}/{k}": v for k, v in metric.compute().items()}
            self.log_dict({f"val/{k}": v for k, v in values.items()})
            metric.reset()
            results.update(values)
        Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(results))


def _validate(devices: int, out_dir: Path) -> list[dict[str, float]]:
    """Run ``trainer.validate`` and return every rank's computed values."""
    out_dir.mkdir()
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        # "ddp" starts the other ranks by re-running sys.argv, i.e. the whole pytest session; "ddp_spawn"
        # starts them with torch.multiprocessing and pickles the module, which works from inside a test.
        strategy="ddp_spawn" if devices > 1 else "auto",
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    trainer.validate(EvalModule(dataset_length=7, out_dir=str(out_dir)))
    per_rank = [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(devices)]
    # ddp_spawn hands rank 0's callback_metrics back to this process; Lightning keeps them as float32.
    logged = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items()}
    assert logged == pytest.approx(per_rank[0], rel=1e-6, nan_ok=True)
    return per_rank


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lightning_ddp_validation_matches_single_device(tmp_path: Path) -> None:
    (single,) = _validate(devices=1, out_dir=tmp_path / "single")
    assert single == pytest.approx(single_process_result(7), abs=1e-12, nan_ok=True)
    for result in _validate(devices=2, out_dir=tmp_path / "ddp"):
        assert result == pytest.approx(single, abs=1e-12, nan_ok=True)
