#!/usr/bin/env bash
# Set up and run the main job end to end on a tiny random pair: make checkpoints, export a bundle,
# generate with APD and with one-token-per-step decoding.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
mkdir -p out
.venv/bin/apd-deploy make-tiny out/tiny --overwrite
.venv/bin/apd-deploy export --dllm out/tiny/dllm --verifier out/tiny/verifier -o out/tiny-bundle --overwrite
.venv/bin/apd-deploy generate out/tiny-bundle --prompt "Hello" --max-new-tokens 48
.venv/bin/apd-deploy generate out/tiny-bundle --prompt "Hello" --max-new-tokens 48 --alg leftright
