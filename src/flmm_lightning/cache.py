"""The frozen LMM's feature cache from the command line (``docs/feature-cache.md``).

``python -m flmm_lightning.cache size [--limit N] [overrides]``: bytes per object and in all for the data
config and model that ``train`` would compose from the same overrides, worked out from the encoded prompts and
the model's config alone (no LMM forward, nothing written).

``python -m flmm_lightning.cache fill data.feature_cache=<folder> [overrides]``: the pre-pass. Every sample of
every configured set through the frozen LMM, through Lightning under the configured trainer (``trainer=ddp
trainer.devices=8``, several nodes: each rank walks its share and writes its own shards), at the trainer's
precision, so that training and evaluation then find every entry.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning import LightningModule
from omegaconf import DictConfig
from rich.progress import track
from torch.utils.data import DataLoader
from transformers import AutoConfig

from flmm_lightning.common.feature_store import entry_bytes
from flmm_lightning.config.composition import CONF_DIR, register_resolvers
from flmm_lightning.core import FLMM
from flmm_lightning.data.batch import GroundingBatch
from flmm_lightning.data.datamodule import GroundingDataModule
from flmm_lightning.data.sampler import UnpaddedDistributedSampler
from flmm_lightning.lmm.hf import resolve_dtype
from flmm_lightning.runs.build import build_datamodule, build_module, build_prompt_builder
from flmm_lightning.training.feature_cache import FeatureCacheWriter, open_feature_cache

# LMM families whose maps stack two grids per image (base and any-res: ``lmm.llava_next``).
GRIDS_PER_IMAGE = {"llava_next": 2}


def compose_train_config(overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` with ``overrides``, as ``train`` composes it."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------- sizing
def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def size_report(cfg: DictConfig, limit: int | None) -> dict[str, dict[str, float]]:
    """Per set: samples, objects and bytes of the cache entries, measured on up to ``limit`` samples spread
    over the set and scaled to the whole set; plus ``"total"``."""
    prompt_builder = build_prompt_builder(cfg)
    datamodule = build_datamodule(cfg.data, prompt_builder, cfg.sam.image_size)
    lmm_cfg = cfg.model.lmm
    config = AutoConfig.from_pretrained(str(lmm_cfg.pretrained), trust_remote_code=lmm_cfg.trust_remote_code)
    text = config.get_text_config()
    layers, heads, hidden_size = text.num_hidden_layers, text.num_attention_heads, text.hidden_size
    channels = GRIDS_PER_IMAGE.get(config.model_type, 1) * layers * heads
    hidden_bytes = torch.empty((), dtype=resolve_dtype(lmm_cfg.torch_dtype)).element_size()
    every_utterance_token = bool(lmm_cfg.get("keyword_selector"))
    report: dict[str, dict[str, float]] = {}
    for name, encoded in datamodule.encoded_sets().items():
        total = len(encoded)
        count = total if limit is None else min(limit, total)
        indices = sorted({round(i * total / count) for i in range(count)}) if count else []
        samples = objects = size = 0
        for index in track(indices, description=f"sizing {name}", transient=True):
            item = encoded.dataset[index]
            if not hasattr(item, "phrases"):
                continue  # a SkippedSample: no entry
            if encoded.fit_to_context:
                item = prompt_builder.fit_to_context(item)
            prompt = prompt_builder(item)
            utterance = prompt.input_ids.shape[0] - prompt.utterance_start
            rows = utterance if every_utterance_token else int((prompt.mask_ids >= 0).sum())
            samples += 1
            objects += item.num_objects
            size += entry_bytes(
                item.num_objects, channels, prompt.grid_hw, layers, hidden_size, rows, hidden_bytes
            )
        scale = total / len(indices) if indices else 0.0
        report[name] = {
            "samples": total,
            "measured": samples,
            "objects": objects * scale,
            "bytes": size * scale,
            "bytes_per_object": size / objects if objects else 0.0,
        }
    objects = sum(entry["objects"] for entry in report.values())
    size = sum(entry["bytes"] for entry in report.values())
    report["total"] = {
        "samples": sum(entry["samples"] for entry in report.values()),
        "measured": sum(entry["measured"] for entry in report.values()),
        "objects": objects,
        "bytes": size,
        "bytes_per_object": size / objects if objects else 0.0,
    }
    report["model"] = {
        "channels": channels,
        "layers": layers,
        "hidden_size": hidden_size,
        "hidden_bytes": hidden_bytes,
        "every_utterance_token": every_utterance_token,
    }
    return report


def print_size_report(cfg: DictConfig, report: dict[str, dict[str, float]]) -> None:
    model = report["model"]
    dtype = {2: "bfloat16", 4: "float32"}[int(model["hidden_bytes"])]
    rows = "every utterance token (keyword selector)" if model["every_utterance_token"] else "grounded tokens"
    print(
        f"feature cache for model={cfg.model.name}: maps {int(model['channels'])} channels in float32; "
        f"hidden states {int(model['layers'])} layers x {int(model['hidden_size'])} in {dtype} per token, "
        f"at {rows}"
    )
    print(f"{'set':<32} {'samples':>9} {'objects':>10} {'per object':>12} {'total':>12}")
    for name, entry in report.items():
        if name == "model":
            continue
        measured = (
            "" if entry["measured"] == entry["samples"] else f"  (from {int(entry['measured'])} samples)"
        )
        print(
            f"{name:<32} {int(entry['samples']):>9} {round(entry['objects']):>10} "
            f"{human_bytes(entry['bytes_per_object']):>12} {human_bytes(entry['bytes']):>12}{measured}"
        )
    print("no cache was written; turn it on with data.feature_cache=<folder>")


# ---------------------------------------------------------------------------------------------- filling
class FeatureFill(LightningModule):
    """The pre-pass as a Lightning predict loop: each rank computes the frozen features of its share of every
    set that the cache does not hold yet and queues them to its own store (``FeatureCacheWriter`` writes the
    shards)."""

    def __init__(self, model: FLMM, datamodule: GroundingDataModule) -> None:
        super().__init__()
        self.model = model
        self.source = datamodule

    def predict_dataloader(self) -> list[DataLoader]:
        datamodule, loaders = self.source, []
        for encoded in datamodule.encoded_sets().values():
            sampler = UnpaddedDistributedSampler(encoded) if torch.distributed.is_initialized() else None
            loaders.append(
                DataLoader(
                    encoded,
                    batch_size=datamodule.eval_batch_size,
                    sampler=sampler,
                    num_workers=datamodule.num_workers,
                    collate_fn=datamodule.collate,
                )
            )
        return loaders

    def predict_step(self, batch: GroundingBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch.samples and not all(entry is not None for entry in batch.cached_features or [None]):
            self.model.lmm_features(batch)


def fill(cfg: DictConfig) -> int:
    """Runs the pre-pass; returns the number of entries this process wrote."""
    if not cfg.data.get("feature_cache"):
        raise SystemExit("error: fill needs data.feature_cache=<folder>")
    prompt_builder = build_prompt_builder(cfg)
    datamodule = build_datamodule(cfg.data, prompt_builder, cfg.sam.image_size)
    module = build_module(cfg)
    store = open_feature_cache(module, datamodule, cfg.trainer.get("precision"))
    root = Path(str(cfg.data.feature_cache)).expanduser()
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=[FeatureCacheWriter(store)],
        logger=False,
        enable_checkpointing=False,
        default_root_dir=str(root),
    )
    trainer.predict(FeatureFill(module.model.eval(), datamodule), return_predictions=False)
    if trainer.is_global_zero:
        print(
            f"feature cache {store.directory}: {store.stats.computed} samples computed, "
            f"{store.stats.served} already there, {store.stats.writes} entries written by this rank"
        )
    return store.stats.writes


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flmm_lightning.cache",
        description="The frozen LMM's feature cache: size it (nothing written) or fill it in a pre-pass.",
    )
    parser.add_argument("action", choices=("size", "fill"))
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, as for train (e.g. +experiment=refcoco)"
    )
    parser.add_argument(
        "--limit", type=int, default=1000, help="size: measure at most N samples per set and scale (0: all)"
    )
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = compose_train_config(args.overrides)
    if args.action == "size":
        print_size_report(cfg, size_report(cfg, args.limit or None))
    else:
        fill(cfg)


if __name__ == "__main__":
    main()
