"""The frozen LMM's feature cache (``data.feature_cache``): training from it is training from live features,
bit for bit; what changes the features misses it; a damaged store is recomputed, a full disk is an error."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_overrides
from hydra.utils import instantiate
from lightning import Callback, LightningModule, Trainer, seed_everything
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from test_reliability_resume import FAST, QUIET

from flmm_lightning.cache import fill, size_report
from flmm_lightning.common.feature_store import FeatureCacheError, FeatureStore, feature_key
from flmm_lightning.runs.build import build_datamodule, build_module, build_prompt_builder
from flmm_lightning.training.callbacks import with_training_guards
from flmm_lightning.training.feature_cache import FeatureCacheWriter, check_cacheable, open_feature_cache

pytestmark = pytest.mark.usefixtures("pinned_threads")

# Two epochs of the demo's data (12 training images) with nothing but training. One sample per batch: on the
# CPU a sample's LMM features change in their last bits with the batch it shares a forward with (its padded
# length), so live features are a function of the sample alone, as a cache's are, only at batch 1.
TWO_EPOCHS = [
    *FAST,
    *QUIET,
    "trainer.max_steps=-1",
    "trainer.max_epochs=2",
    "callbacks=none",
    "data.batch_size=1",
]


class LossRecorder(Callback):
    """Every training step's loss, and how many of its samples the cache served."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.served: list[int] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())
        cached = batch.cached_features or []
        self.served.append(sum(entry is not None for entry in cached))


def fit(compose_config, tmp_path: Path, cache: Path | None) -> dict[str, Any]:
    overrides = [*tiny_overrides(tmp_path / "data", tmp_path / "run"), *TWO_EPOCHS]
    if cache is not None:
        overrides.append(f"data.feature_cache={cache}")
    cfg = compose_config(overrides)
    seed_everything(cfg.seed)
    datamodule = build_datamodule(cfg.data, build_prompt_builder(cfg), cfg.sam.image_size)
    module = build_module(cfg)
    store = open_feature_cache(module, datamodule, cfg.trainer.precision)
    recorder = LossRecorder()
    extra = [] if store is None else [FeatureCacheWriter(store)]
    trainer = instantiate(
        cfg.trainer,
        callbacks=with_training_guards([recorder, *extra]),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=datamodule)
    return {"recorder": recorder, "module": module, "store": store, "cfg": cfg}


@pytest.mark.slow
def test_training_from_the_cache_matches_live_features_bit_for_bit(compose_config, tmp_path: Path) -> None:
    live = fit(compose_config, tmp_path / "live", cache=None)
    cached = fit(compose_config, tmp_path / "cached", cache=tmp_path / "features")

    steps = len(live["recorder"].losses)
    per_epoch = steps // 2
    # The first epoch fills the cache, the second is served from it alone: the LMM never runs.
    assert cached["recorder"].served[:per_epoch] == [0] * per_epoch
    assert all(served > 0 for served in cached["recorder"].served[per_epoch:])
    stats = cached["store"].stats
    assert stats.computed == sum(cached["recorder"].served[per_epoch:]) == stats.served
    assert stats.writes == stats.computed and stats.corrupt == 0
    # Same losses, same trained weights, to the bit.
    assert len(cached["recorder"].losses) == steps
    for step, (a, b) in enumerate(zip(live["recorder"].losses, cached["recorder"].losses, strict=True)):
        assert torch.equal(a, b), f"step {step}: loss {a.item()!r} live, {b.item()!r} cached"
    live_weights, cached_weights = live["module"].state_dict(), cached["module"].state_dict()
    assert live_weights.keys() == cached_weights.keys()
    for key, value in live_weights.items():
        assert torch.equal(value, cached_weights[key]), key


@pytest.fixture(scope="module")
def tiny_parts(tiny_config):
    """The demo's prompt builder, datamodule and (untrained) module, and one encoded training sample."""
    prompt_builder = build_prompt_builder(tiny_config)
    datamodule = build_datamodule(tiny_config.data, prompt_builder, tiny_config.sam.image_size)
    module = build_module(tiny_config)
    sample = datamodule.train_sets["synthetic_refcoco_train"][0]
    return prompt_builder, datamodule, module, sample


def test_changed_prompt_image_or_lmm_setting_misses(tiny_config, tiny_parts, tmp_path: Path) -> None:
    prompt_builder, datamodule, module, sample = tiny_parts
    lmm = module.model.lmm
    identity = lmm.feature_identity()
    key = feature_key(identity, prompt_builder(sample))
    store = FeatureStore(tmp_path, identity)
    batch = datamodule.collate([datamodule.encoded_sets()["synthetic_refcoco_train"][0]])
    store.put(key, lmm.frozen_features(batch.lmm)[0])
    store.flush()

    # The same sample and LMM, rebuilt from the same config, find the entry (the key is stable).
    assert feature_key(build_module(tiny_config).model.lmm.feature_identity(), prompt_builder(sample)) == key
    assert store.get(key) is not None

    # Another instruction, another processor pixel budget, another image, another LMM read-out setting.
    other_prompt = build_prompt_builder(tiny_config)
    other_prompt.instruction = "Describe the image."
    other_processor = build_prompt_builder(tiny_config)
    other_processor.max_pixels = prompt_builder.max_pixels // 2
    image = sample.image.copy()
    image.putpixel((0, 0), tuple(255 - v for v in image.getpixel((0, 0))))
    changed_image = type(sample)(**{**sample.__dict__, "image": image})
    merge_max = build_module(_with(tiny_config, "model.lmm.merge", "max")).model.lmm.feature_identity()
    misses = {
        "instruction": feature_key(identity, other_prompt(sample)),
        "processor": feature_key(identity, other_processor(sample)),
        "image": feature_key(identity, prompt_builder(changed_image)),
        "merge": feature_key(merge_max, prompt_builder(sample)),
        "precision": feature_key(f"{identity}|precision=bf16-mixed", prompt_builder(sample)),
    }
    for what, changed in misses.items():
        assert changed != key, what
        assert store.get(changed) is None, what

    # Other weights of the same architecture: another identity.
    with torch.no_grad():
        next(lmm.model.parameters()).add_(1.0)
    lmm._feature_identity = None
    try:
        assert lmm.feature_identity() != identity
    finally:
        with torch.no_grad():
            next(lmm.model.parameters()).sub_(1.0)
        lmm._feature_identity = None


def _with(config: DictConfig, key: str, value: Any) -> DictConfig:
    changed = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
    OmegaConf.update(changed, key, value)
    return changed


def shard_of(store: FeatureStore) -> Path:
    (shard,) = store.directory.glob("*.safetensors")
    return shard


def test_corrupt_or_truncated_shard_is_recomputed_never_served(tiny_parts, tmp_path: Path, caplog) -> None:
    _, datamodule, module, _ = tiny_parts
    encoded = datamodule.encoded_sets()["synthetic_refcoco_train"]
    batch = datamodule.collate([encoded[0], encoded[1]])
    store = FeatureStore(tmp_path, module.model.lmm.feature_identity())
    keys = [feature_key(store.identity, encoded[i].prompt) for i in range(2)]
    entries = module.model.lmm.frozen_features(batch.lmm)
    for key, entry in zip(keys, entries, strict=True):
        store.put(key, entry)
    shard = store.flush()
    # An interrupted write leaves a hidden temporary file: never read.
    (shard.parent / f".{shard.name}.tmp").write_bytes(shard.read_bytes()[:100])

    served = FeatureStore(tmp_path, store.identity).get(keys[0])
    assert torch.equal(served.attention_maps, entries[0].attention_maps)
    assert torch.equal(served.hidden_states, entries[0].hidden_states)
    assert served.padded_hw == entries[0].padded_hw and served.content_box == entries[0].content_box

    # One flipped byte in the data section: the entry it falls in fails its CRC-32 and is not served.
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = FeatureStore(tmp_path, store.identity)
    with caplog.at_level(logging.WARNING, logger="flmm_lightning.common.feature_store"):
        results = [reader.get(key) for key in keys]
    assert sum(result is None for result in results) == 1 and reader.stats.corrupt == 1
    assert "fails its CRC-32" in caplog.text
    for result, entry in zip(results, entries, strict=True):
        if result is not None:
            assert torch.equal(result.hidden_states, entry.hidden_states)

    # A truncated shard: unreadable, reported, nothing served.
    shard.write_bytes(bytes(data[: len(data) // 2]))
    reader = FeatureStore(tmp_path, store.identity)
    with caplog.at_level(logging.WARNING, logger="flmm_lightning.common.feature_store"):
        assert [reader.get(key) for key in keys] == [None, None]
    assert f"unreadable shard {shard}" in caplog.text

    # A shard written for another LMM in this folder is not this cache's.
    other = FeatureStore(tmp_path, "another identity")
    other.directory = store.directory
    other.put(keys[0], entries[0])
    other.flush()
    assert FeatureStore(tmp_path, store.identity).get(keys[0]) is None


def test_full_disk_is_an_error_naming_the_folder(tiny_parts, tmp_path: Path, monkeypatch) -> None:
    _, datamodule, module, _ = tiny_parts
    encoded = datamodule.encoded_sets()["synthetic_refcoco_train"][0]
    store = FeatureStore(tmp_path, module.model.lmm.feature_identity())
    store.put("key", module.model.lmm.frozen_features(datamodule.collate([encoded]).lmm)[0])
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10))
    with pytest.raises(FeatureCacheError, match=f"feature cache {store.directory}: .* 10 free"):
        store.flush()
    assert list(store.directory.iterdir()) == []


def test_random_per_epoch_grouped_by_image_is_refused(compose_config, tmp_path: Path) -> None:
    base = [*tiny_overrides(tmp_path / "data", tmp_path / "run"), "~data.train_sets.synthetic_png_train"]
    mode = "data.train_sets.synthetic_refcoco_train.text_mode=random_per_epoch"
    cfg = compose_config([*base, mode])
    datamodule = build_datamodule(cfg.data, build_prompt_builder(cfg), cfg.sam.image_size)
    with pytest.raises(
        ValueError, match=r"data\.train_sets\.synthetic_refcoco_train: text_mode=random_per_epoch"
    ):
        check_cacheable(datamodule)
    # One ref per sample: cached per sentence.
    cfg = compose_config([*base, mode, "data.train_sets.synthetic_refcoco_train.group_by_image=false"])
    check_cacheable(build_datamodule(cfg.data, build_prompt_builder(cfg), cfg.sam.image_size))


@pytest.mark.slow
def test_prepass_fills_what_training_reads_and_sizing_predicts_its_bytes(
    compose_config, tmp_path: Path
) -> None:
    cache = tmp_path / "features"
    cfg = compose_config(
        [*tiny_overrides(tmp_path / "data", tmp_path / "run"), *TWO_EPOCHS, f"data.feature_cache={cache}"]
    )
    report = size_report(cfg, limit=None)
    assert not cache.exists()  # sizing writes nothing

    written = fill(cfg)
    entries: dict[str, int] = {}
    for shard in cache.rglob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                key = name.split(".")[0]
                entries[key] = entries.get(key, 0) + tensor.numel() * tensor.element_size()
    assert written == len(entries) == report["total"]["samples"]
    assert sum(entries.values()) == report["total"]["bytes"]

    # Training then finds every sample in the cache from its first step: the LMM never runs.
    run = fit(compose_config, tmp_path / "train", cache=cache)
    assert all(served == 1 for served in run["recorder"].served)
    assert run["store"].stats.computed == 0


@pytest.mark.slow
def test_prepass_under_ddp_each_rank_writes_its_own_shards(compose_config, tmp_path: Path) -> None:
    cache = tmp_path / "features"
    cfg = compose_config(
        [
            *tiny_overrides(tmp_path / "data", tmp_path / "run"),
            *FAST,
            "trainer=ddp_cpu",
            "~data.train_sets.synthetic_png_train",
            "~data.val_sets.synthetic_png_val",
            f"data.feature_cache={cache}",
        ]
    )
    fill(cfg)
    shards = sorted(cache.rglob("*.safetensors"))
    writers = {shard.name.rsplit("-", 1)[0] for shard in shards}
    assert len(writers) == 2  # one per rank
    keys: list[str] = []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            keys += sorted({name.split(".")[0] for name in handle.keys()})
    # Every sample exactly once between the ranks (the val set is also the test set: walked once).
    datamodule = build_datamodule(cfg.data, build_prompt_builder(cfg), cfg.sam.image_size)
    assert len(keys) == len(set(keys)) == sum(len(s) for s in datamodule.encoded_sets().values())
