#!/usr/bin/env bash
# Verify and time the TensorRT paths once on a GPU machine (pip install -e '.[gpu]' first):
# builds, runs a 30-step generation four ways, compares with PyTorch, prints one table.
# Options pass through, e.g. scripts/gpu_check.sh --dtype float16 --layers 8.
set -euo pipefail
exec "${PYTHON:-python}" -m adacache_fx.tools.gpu_check "$@"
