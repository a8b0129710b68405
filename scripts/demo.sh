#!/usr/bin/env bash
# The main job, offline, from a fresh clone: export the bundled trained pair (models/arithmetic),
# build its onnxruntime engine, answer a test problem with APD (each step's accepted chunk in its
# own colour), then compare APD with one-token-per-step and K-tokens-per-step decoding.
# The bundle is reused while its checkpoints, the exporting code and the tools are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
APD=.venv/bin/apd-deploy
BUNDLE=${BUNDLE:-out/arithmetic-bundle}
SOURCES=(models/arithmetic apd_deploy export engines pyproject.toml)
if .venv/bin/python scripts/bundle_stamp.py check "$BUNDLE" "${SOURCES[@]}"; then
  echo "reusing $BUNDLE (its sources are unchanged)"
else
  rm -f "$BUNDLE.stamp"  # stamped again only once both the export and the engine build succeed
  echo "exporting the bundled pair (models/arithmetic) to $BUNDLE and building its onnxruntime engine: about a minute"
  "$APD" export --dllm models/arithmetic/dllm --verifier models/arithmetic/verifier -o "$BUNDLE" --overwrite
  "$APD" build-engine "$BUNDLE" --backend onnxruntime --quiet
  .venv/bin/python scripts/bundle_stamp.py write "$BUNDLE" "${SOURCES[@]}"
fi
QUESTION=$(.venv/bin/python -c "from apd_deploy.tasks.arithmetic import problems; print(next(problems('test')).question)")
echo "Q: $QUESTION"
"$APD" generate "$BUNDLE" --engine onnxruntime-cpu-fp32 --chat --prompt "$QUESTION" --max-new-tokens 32
"$APD" eval "$BUNDLE" --engine onnxruntime-cpu-fp32 --n "${N:-100}" --algs apd,leftright:1,leftright:4,leftright:8,ar
