#!/usr/bin/env bash
# Sets up and runs the whole test suite. Without a GPU the kernels run under Triton's interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh test hf
python3 -m ruff check .
python3 -m ruff format --check .
# PYTHONSAFEPATH: the checkout root stays off sys.path, where kernels/ would shadow PyPI's kernels (transformers imports it).
PYTHONSAFEPATH=1 python3 -m pytest -n 2 tests benchmarks --benchmark-disable "$@"
