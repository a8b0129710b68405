#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build engines for a tiny bundle, generate with each available
# backend (onnxruntime CUDA, TensorRT, the cupy array backend) and compare tokens and logits with the
# CPU numpy run.
# Backends whose packages are missing are skipped with the reason. Arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# Checked without the current directory on sys.path, as gpu_check.py will import it: from here the
# source folder apd_deploy/ would import, but the script's own path starts at scripts/.
if ! "$PYTHON" -c "import sys; sys.path.pop(0); import apd_deploy.runtime" 2>/dev/null; then
  # Offline machines: install this checkout without fetching anything.
  "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e .
fi
# TensorRT on a machine without an index to install from: TENSORRT_WHEELS=DIR holds the wheels of
# tensorrt-cu12 / -cu13 and its -bindings and -libs (from NVIDIA's index, brought along).
if [ -n "${TENSORRT_WHEELS:-}" ] && ! "$PYTHON" -c "import tensorrt" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet --no-index --find-links "$TENSORRT_WHEELS" "$TENSORRT_WHEELS"/*.whl
fi
exec timeout 570 "$PYTHON" scripts/gpu_check.py "$@"
