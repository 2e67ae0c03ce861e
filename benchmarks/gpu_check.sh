#!/usr/bin/env bash
# The GPU check, in one call on a fresh H100/H200 machine: installs this checkout into the
# machine's own Python (its torch and triton are kept; nothing is downloaded), then runs
# python -m fused_softmax.bench.gpu_check, which writes results.json, results.md, gpu_check.log
# and plots to OUT_DIR (default: $OUT where set, else benchmarks/results/<device>-<date>).
#
#   FUSED_SOFTMAX_COMMIT=<hash> bash benchmarks/gpu_check.sh [OUT_DIR]
#   bash benchmarks/gpu_check.sh --dry-run [OUT_DIR]     # on a CPU, under Triton's interpreter
#
# FUSED_SOFTMAX_COMMIT names the commit where the tree arrives without .git (the device tool
# copies files only). GPU_CHECK_BUDGET_S (default 450) bounds the whole check, the install
# included; 20 s past it a hard limit stops Python, which still writes what it has.
set -euo pipefail
started=$(date +%s)
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET_S:-450}
if [[ " $* " == *" --dry-run "* ]]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
    # No registry is reachable: no dependencies, no isolated build (setuptools comes from the image).
    PIP_ROOT_USER_ACTION=ignore timeout 120 "$python" -m pip install --quiet --no-deps --no-index \
        --no-build-isolation --editable .
fi
left=$((budget - ($(date +%s) - started)))
PYTHONUNBUFFERED=1 exec timeout --signal=TERM --kill-after=15 $((left + 20)) \
    "$python" -m fused_softmax.bench.gpu_check --budget-s "$budget" --started "$started" "$@"
