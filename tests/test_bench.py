"""The benchmark runs on the tiny assets and writes a sane report (a smoke test: nothing here is timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flmm_lightning.bench import PATHS, STAGES


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
    ]
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    report = json.loads(out.read_text())

    assert report["size"] == "tiny" and report["device"].startswith("cpu")
    assert report["date"] and report["command"].startswith("python -m flmm_lightning.bench")
    for path in PATHS:
        assert report[path]["samples_per_s"] > 0, path
        assert report[path]["peak_mem_mb"] > 0, path
        assert set(report["stages"][path]) == set(STAGES), path
        assert all(value >= 0 for value in report["stages"][path].values()), path
        assert report["lmm_tflops"][path] > 0, path
    # fp32 on the CPU: the fused capture is exact up to float rounding.
    assert report["attention_max_abs_diff"] <= 1e-5
    assert report["attention_max"] > 0
    assert report["speedup"]["fast"] > 0
    # The warm cache served every image of the cached path; no entry was rewritten.
    cache = report["fast_cached"]["cache"]
    assert cache["hits"] > 0 and cache["misses"] == cache["stale"] == cache["corrupt"] == cache["writes"] == 0
    # --profile: one operator table per path, beside the JSON.
    profile = Path(report["profile"]).read_text()
    assert profile == (tmp_path / "tiny.profile.txt").read_text()
    assert [line for line in profile.splitlines() if line.startswith("== ")] == [f"== {p} ==" for p in PATHS]
    assert "aten::" in profile
