#!/usr/bin/env bash
# Train the bundled demo pair (models/arithmetic) on a 2-core CPU in about 100 minutes, each phase on
# both cores (phases side by side fought for them: 3 threads on 2 cores made each step 1.5x
# slower): the dLLM's shape trained AR, the verifier (it checks solutions; alone it solves about
# half), the dLLM's masked-diffusion stage, then twice more of it from where it stopped (each with
# a fresh learning-rate schedule). Logs and records go to models/arithmetic/training-*.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-models/arithmetic}
mkdir -p "$OUT"
DIFFUSION="--phase dllm-diffusion --batch 32 --lr 2e-4 --first-weight 4 --threads 2 --out $OUT"
"$PY" training/train_demo.py --phase dllm-ar --minutes 25 --threads 2 --out "$OUT" > "$OUT/training-dllm-ar.log" 2>&1
"$PY" training/train_demo.py --phase verifier --minutes 8 --threads 2 --out "$OUT" > "$OUT/training-verifier.log" 2>&1
"$PY" training/train_demo.py $DIFFUSION --minutes 22 --eval-minutes 5 > "$OUT/training-dllm-diffusion.log" 2>&1
for more in 2 3; do
  "$PY" training/train_demo.py $DIFFUSION --resume --minutes 20 --eval-minutes 30 --record "training-dllm-diffusion-$more.json" \
      > "$OUT/training-dllm-diffusion-$more.log" 2>&1
done
