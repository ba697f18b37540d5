"""The bench's inputs: the first training batches of the composed ``data`` config, as each path takes them."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image

from flmm_lightning.boundaries import GroundingSample, PromptBuilder, PromptInputs
from flmm_lightning.data.batch import GroundingBatch
from flmm_lightning.runs.build import build_datamodule
from flmm_lightning.training.module import FLMMModule


@dataclass
class BenchBatch:
    """One training batch as each path consumes it, already on the device."""

    batched: GroundingBatch  # the batched paths: all samples in one batch
    singles: list[GroundingBatch]  # the per-sample path: one batch per sample
    processor_s: float  # encoding + collating the batch (dataloader-worker work)
    processor_singles_s: float
    prompts: list[PromptInputs] = dataclasses.field(default_factory=list)  # each sample's encoded LMM input
    # ``batched`` as the LMM feature cache serves it (``cached_features`` set; the ``fast_featcache`` path)
    served: GroundingBatch | None = None


def resized(sample: GroundingSample, image_size: tuple[int, int]) -> GroundingSample:
    """``sample`` at ``(width, height)``: the image bilinear, the masks nearest-neighbour."""
    width, height = image_size
    image = sample.image.resize((width, height), Image.Resampling.BILINEAR)
    masks = F.interpolate(sample.masks[:, None].float(), size=(height, width), mode="nearest")[:, 0] > 0.5
    return dataclasses.replace(sample, image=image, masks=masks)


def training_batches(
    cfg: DictConfig,
    module: FLMMModule,
    prompt_builder: PromptBuilder,
    num_batches: int,
    image_size: tuple[int, int] | None,
    device: torch.device,
) -> list[BenchBatch]:
    """The first ``num_batches`` batches of the first epoch of ``cfg.data``'s training loader (its sampler,
    its batch size, its context fitting), each also split into one batch per sample.

    ``image_size``: every sample resized to it first (None keeps the data's own sizes).
    """
    datamodule = build_datamodule(cfg.data, prompt_builder, module.model.sam.img_size)
    loader = datamodule.train_dataloader()
    encoded_dataset, collate = loader.dataset, loader.collate_fn
    _ = prompt_builder.processor  # loaded now, so that its one-off cost is not timed
    samples: list[GroundingSample] = []
    for key in loader.sampler:
        if len(samples) == num_batches * loader.batch_size:
            break
        sample = encoded_dataset.dataset[key.index]
        if isinstance(sample, GroundingSample):  # a SkippedSample (no mask) is not trained on
            samples.append(sample if image_size is None else resized(sample, image_size))
    if len(samples) < num_batches * loader.batch_size:
        raise ValueError(
            f"data.train_sets hold {len(samples)} usable samples; the bench needs {num_batches} batches of "
            f"data.batch_size={loader.batch_size}"
        )

    batches = []
    for start in range(0, len(samples), loader.batch_size):
        began = time.perf_counter()
        encoded = [encoded_dataset.encode(sample) for sample in samples[start : start + loader.batch_size]]
        batched = collate(encoded)
        encoded_s = time.perf_counter() - began
        began = time.perf_counter()
        singles = [collate([item]) for item in encoded]
        # The per-sample path encodes the same samples and collates each on its own.
        singles_s = encoded_s + time.perf_counter() - began
        batches.append(
            BenchBatch(
                batched=module.transfer_batch_to_device(batched, device, 0),
                singles=[module.transfer_batch_to_device(single, device, 0) for single in singles],
                processor_s=encoded_s,
                processor_singles_s=singles_s,
                prompts=[item.prompt for item in encoded],
            )
        )
    return batches
