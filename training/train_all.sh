#!/usr/bin/env bash
# Train the bundled demo pair (models/arithmetic) on a 2-core CPU in about an hour, each phase on
# both cores (phases side by side fought for them: 3 threads on 2 cores made each step 1.5x
# slower): the dLLM's shape trained AR, the verifier (it checks solutions; alone it solves about
# half), the dLLM's masked-diffusion stage, then more of it from where it stopped with every masked
# position weighted alike (a fresh learning-rate schedule). Logs and records go to
# models/arithmetic/training-*.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-models/arithmetic}
mkdir -p "$OUT"
DIFFUSION="--phase dllm-diffusion --lr 2e-4 --eval-minutes 30 --threads 2 --out $OUT"
"$PY" training/train_demo.py --phase dllm-ar --minutes 19 --batch 32 --threads 2 --out "$OUT" > "$OUT/training-dllm-ar.log" 2>&1
"$PY" training/train_demo.py --phase verifier --minutes 6 --threads 2 --out "$OUT" > "$OUT/training-verifier.log" 2>&1
"$PY" training/train_demo.py $DIFFUSION --batch 32 --first-weight 4 --minutes 21 > "$OUT/training-dllm-diffusion.log" 2>&1
"$PY" training/train_demo.py $DIFFUSION --batch 24 --first-weight 1 --resume --minutes 16 --record training-dllm-diffusion-2.json \
    > "$OUT/training-dllm-diffusion-2.log" 2>&1
