"""The benchmark runs on the tiny assets from train's config groups and writes a sane report (a smoke test:
nothing here is timed); its FLOP count covers every sample of a batch, for any family."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from transformers import Qwen2_5_VLConfig

from flmm_lightning.assets.synthetic_data import SyntheticPaths
from flmm_lightning.bench import PATHS, STAGES
from flmm_lightning.bench.build import SIZES, compose_bench_config
from flmm_lightning.bench.flops import lmm_forward_flops
from flmm_lightning.data.refcoco import RefCocoDataset
from flmm_lightning.runs.build import build_prompt_builder


@pytest.mark.slow
def test_tiny_bench_writes_a_sane_report(tmp_path: Path):
    out = tmp_path / "tiny.json"
    command = [
        sys.executable,
        "-m",
        "flmm_lightning.bench",
        "--size=tiny",
        "--warmup=1",
        "--steps=2",
        "--batch-size=2",
        # One thread: on a small shared CI machine, several threads contend and the run takes much longer.
        "--threads=1",
        f"--cache-dir={tmp_path / 'sam_cache'}",
        f"--out={out}",
        "--profile",
        # Hydra overrides of conf/train.yaml, as for train: a small synthetic dataset in the test's folder.
        f"paths.data_dir={tmp_path / 'data'}",
        "data.synthetic.num_train=6",
        "data.synthetic.num_val=2",
    ]
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    report = json.loads(out.read_text())

    assert report["size"] == "tiny" and report["device"].startswith("cpu")
    # train.yaml's defaults, the batch size from data.batch_size (set by --batch-size).
    assert (report["model"], report["sam"], report["data"]) == ("tiny_qwen2_5_vl", "tiny", "synthetic")
    assert report["batch_size"] == 2 and "data.batch_size=2" in report["overrides"]
    assert report["date"] and report["command"].startswith("python -m flmm_lightning.bench")
    for path in PATHS:
        assert report[path]["samples_per_s"] > 0, path
        assert report[path]["peak_mem_mb"] > 0, path
        assert set(report["stages"][path]) == set(STAGES), path
        assert all(value >= 0 for value in report["stages"][path].values()), path
        # fast_featcache runs no LMM forward: its features come from the feature cache
        assert (report["lmm_tflops"][path] is None) == (path == "fast_featcache"), path
        assert path == "fast_featcache" or report["lmm_tflops"][path] > 0, path
    assert report["lmm_tflop_per_sample"] > 0
    # fp32 on the CPU: the fused capture is exact up to float rounding.
    assert report["attention_max_abs_diff"] <= 1e-5
    assert report["attention_max"] > 0
    assert report["speedup"]["fast"] > 0
    # The warm cache served every image of the cached path; no entry was rewritten.
    cache = report["fast_cached"]["cache"]
    assert cache["hits"] > 0 and cache["misses"] == cache["stale"] == cache["corrupt"] == cache["writes"] == 0
    # The feature cache served every sample of the fast_featcache path, which ran neither LMM nor capture.
    feature_cache = report["feature_cache"]
    assert feature_cache["read_ms"] > 0 and feature_cache["bytes_per_sample"] > 0
    featcache_stages = report["stages"]["fast_featcache"]
    assert featcache_stages["lmm"] == featcache_stages["attention_capture"] == 0
    assert featcache_stages["feature_cache_read"] == feature_cache["read_ms"]
    # --profile: one operator table per path, beside the JSON.
    profile = Path(report["profile"]).read_text()
    assert profile == (tmp_path / "tiny.profile.txt").read_text()
    assert [line for line in profile.splitlines() if line.startswith("== ")] == [f"== {p} ==" for p in PATHS]
    assert "aten::" in profile


@pytest.mark.parametrize("family", ["tiny_qwen2_5_vl", "tiny_llava_next"])
def test_lmm_flops_count_each_sample_of_a_batch(family: str, compose_config, synthetic_data: SyntheticPaths):
    """Two identical samples in one batch are the one sample's computation twice (same length: no padding),
    so the count is exactly double; the capture the model runs with is restored."""
    cfg = compose_config([f"model={family}"])
    prompt_builder = build_prompt_builder(cfg)  # builds the tiny asset the config names
    lmm = instantiate(cfg.model.lmm)
    prompt = prompt_builder(RefCocoDataset(**synthetic_data.refcoco_kwargs("train"))[0])

    one = lmm_forward_flops(lmm, prompt_builder.collate([prompt]))
    two = lmm_forward_flops(lmm, prompt_builder.collate([prompt, prompt]))

    assert one > 0
    assert two == 2 * one
    assert lmm.capture.name == "fused"


def test_the_gpu_size_composes_the_released_architectures():
    """``--size qwen2_5_vl_3b`` (run on a GPU only): train's 3B and ViT-L groups, the LMM's ``pretrained`` an
    architecture to build with random weights instead of a checkpoint to download."""
    cfg = compose_bench_config(SIZES["qwen2_5_vl_3b"], ["paths.cache_dir=/nonexistent"])
    assert (cfg.model.name, cfg.sam.name, cfg.data.batch_size) == ("qwen2_5_vl_3b", "vit_l", 8)
    assert cfg.sam.refiner.sam.checkpoint is None
    architecture = instantiate(cfg.model.lmm.pretrained)
    assert isinstance(architecture, Qwen2_5_VLConfig)
    text = architecture.text_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.hidden_size) == (36, 16, 2048)
