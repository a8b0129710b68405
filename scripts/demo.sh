#!/usr/bin/env bash
# The main job, offline, from a fresh clone: export the bundled trained pair (models/arithmetic),
# build its onnxruntime engine, answer a test problem with APD (each step's accepted chunk in its
# own colour), then compare APD with one-token-per-step and K-tokens-per-step decoding.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
APD=.venv/bin/apd-deploy
BUNDLE=out/arithmetic-bundle
"$APD" export --dllm models/arithmetic/dllm --verifier models/arithmetic/verifier -o "$BUNDLE" --overwrite --quiet
"$APD" build-engine "$BUNDLE" --backend onnxruntime --quiet
QUESTION=$(.venv/bin/python -c "from apd_deploy.tasks.arithmetic import problems; print(next(problems('test')).question)")
echo "Q: $QUESTION"
"$APD" generate "$BUNDLE" --engine onnxruntime-cpu-fp32 --chat --prompt "$QUESTION" --max-new-tokens 32
"$APD" eval "$BUNDLE" --engine onnxruntime-cpu-fp32 --n "${N:-100}" --algs apd,leftright:1,leftright:4,leftright:8
