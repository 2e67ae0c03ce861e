#!/usr/bin/env bash
# Installs fused_softmax (editable) into the current Python, with the extras named as arguments.
# A CPU build of torch is installed only when no torch is present: an existing CUDA build is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install --quiet torch==2.13.0
extras=$(IFS=,; echo "$*")
python3 -m pip install --quiet --editable ".${extras:+[$extras]}"
