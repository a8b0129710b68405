#!/usr/bin/env bash
# Train the bundled demo pair (models/arithmetic) on a 2-core CPU in about an hour:
# the verifier (stopped before it solves half the validation problems alone) and the dLLM's AR
# stage side by side on one core each, then the dLLM's masked-diffusion stage on both cores.
# Logs go to models/arithmetic/training-*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-models/arithmetic}
mkdir -p "$OUT"
"$PY" training/train_demo.py --phase verifier --minutes "${VERIFIER_MINUTES:-20}" --max-accuracy 0.5 --threads 1 --out "$OUT" > "$OUT/training-verifier.log" 2>&1 &
verifier=$!
"$PY" training/train_demo.py --phase dllm-ar --minutes "${AR_MINUTES:-25}" --threads 1 --out "$OUT" > "$OUT/training-dllm-ar.log" 2>&1
wait "$verifier"
"$PY" training/train_demo.py --phase dllm-diffusion --minutes "${DIFFUSION_MINUTES:-40}" --threads 2 --out "$OUT" > "$OUT/training-dllm-diffusion.log" 2>&1
