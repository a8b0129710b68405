#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build engines for a tiny bundle, generate with each available
# backend (onnxruntime CUDA, TensorRT, the cupy array backend) and compare with the CPU numpy run.
# Backends whose packages are missing are skipped with the reason. Arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if ! "$PYTHON" -c "import apd_deploy.runtime" 2>/dev/null; then
  # Offline machines: install this checkout without fetching anything.
  "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e .
fi
exec timeout 570 "$PYTHON" scripts/gpu_check.py "$@"
