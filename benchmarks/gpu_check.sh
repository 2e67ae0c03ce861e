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
# The checkout root off sys.path (Python 3.11+): there kernels/ would shadow PyPI's kernels, which
# transformers (and peers built on it) import.
export PYTHONSAFEPATH=1
python=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET_S:-450}

# The package importable from a temporary folder of links, its kernels where setuptools maps
# them (fused_softmax.kernels is kernels/): needs no build, and leaves the environment as it was.
link_checkout() {
    local site
    site=$(mktemp -d)/site
    mkdir -p "$site/fused_softmax"
    ln -s "$PWD"/fused_softmax/* "$site/fused_softmax/"
    ln -s "$PWD/kernels" "$site/fused_softmax/kernels"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    export GPU_CHECK_INSTALL="linked from $site${1:+ ($1)}"
}

if [[ " $* " == *" --dry-run "* ]]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    link_checkout
else
    # No registry is reachable: no dependencies, no isolated build (setuptools comes from the image).
    pip_log=$(mktemp)
    if PIP_ROOT_USER_ACTION=ignore timeout 120 "$python" -m pip install --quiet --no-deps --no-index \
        --no-build-isolation --editable . >"$pip_log" 2>&1; then
        export GPU_CHECK_INSTALL="pip install --editable"
    else
        # A setuptools older than 77 rejects pyproject's SPDX license string, for one.
        grep -m 3 -i "error" "$pip_log" || tail -n 5 "$pip_log"
        link_checkout "pip install failed"
    fi
fi
echo "fused_softmax: $GPU_CHECK_INSTALL"
"$python" -c "import fused_softmax.kernels" || { echo "fused_softmax is not importable: nothing was run"; exit 1; }
left=$((budget - ($(date +%s) - started)))
PYTHONUNBUFFERED=1 exec timeout --signal=TERM --kill-after=15 $((left + 20)) \
    "$python" -m fused_softmax.bench.gpu_check --budget-s "$budget" --started "$started" "$@"
