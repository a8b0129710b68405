#!/usr/bin/env bash
# Train the bundled demo pair (models/arithmetic) on a 2-core CPU in about an hour, each phase
# on both cores (phases side by side fought for them: 3 threads on 2 cores made each step 1.5x
# slower): the dLLM's shape trained AR, the verifier (it stops before it solves half the validation
# problems alone), then the dLLM's masked-diffusion stage. Logs go to models/arithmetic/training-*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-models/arithmetic}
mkdir -p "$OUT"
"$PY" training/train_demo.py --phase dllm-ar --minutes "${AR_MINUTES:-25}" --threads 2 --out "$OUT" > "$OUT/training-dllm-ar.log" 2>&1
"$PY" training/train_demo.py --phase verifier --minutes "${VERIFIER_MINUTES:-10}" --max-accuracy 0.5 --threads 2 --out "$OUT" > "$OUT/training-verifier.log" 2>&1
"$PY" training/train_demo.py --phase dllm-diffusion --minutes "${DIFFUSION_MINUTES:-22}" --batch 32 --lr 2e-4 --first-weight 4 \
    --eval-minutes 5 --threads 2 --out "$OUT" > "$OUT/training-dllm-diffusion.log" 2>&1
