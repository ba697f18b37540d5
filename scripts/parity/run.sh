#!/usr/bin/env bash
# The parity probe of one family: ours, then the official code, then the comparisons.
#   bash scripts/parity/run.sh llava|deepseek_vl|deepseek_vl_hybrid|llava_next [WORK_DIR]
# Needs the probe environment of README.md beside this file: PROBE_PYTHON (the probe venv's python),
# OFFICIAL_SRC (the official repository's files), PROBE_DEPS (the --target dir of its pieces).
set -euo pipefail
family=${1:?family: llava, deepseek_vl, deepseek_vl_hybrid or llava_next}
work=${2:-$(mktemp -d -t flmm_parity_XXXX)}
perturb=(); overrides=()
case $family in
  llava) model=tiny_llava; official=official_llava.py ;;
  deepseek_vl) model=tiny_deepseek_vl; official=official_deepseek.py ;;
  # the hybrid's tiny SAM tower starts with zero positions, relative positions and high-res weight: the probe
  # runs a copy of it with every constant vision tensor made random
  deepseek_vl_hybrid) model=tiny_deepseek_vl_hybrid; official=official_deepseek_hybrid.py
    perturb=(--perturb-constants); overrides=("model.pretrained=$work/lmm") ;;
  llava_next) model=tiny_llava_next; official=official_llava_next.py ;;
  *) echo "unknown family $family" >&2; exit 2 ;;
esac
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
python=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PYTHONPATH=$repo/src $python "$here/ours.py" --model $model --out "$work" "${perturb[@]}"
sam=$(PYTHONPATH=$repo/src $python -c "from flmm_lightning.assets.sam import ensure_tiny_sam; print(ensure_tiny_sam())")
(cd "$work" && env -u PYTHONPATH "${PROBE_PYTHON:?}" "$here/$official" --official "${OFFICIAL_SRC:?}" \
  --deps "${PROBE_DEPS:?}" --work "$work" --sam-checkpoint "$sam")
PYTHONPATH=$repo/src $python "$here/compare.py" --work "$work"
PYTHONPATH=$repo/src $python "$here/converted.py" --model $model --work "$work" "${overrides[@]}"
