#!/usr/bin/env bash
# The main job, offline, from a fresh clone: export the bundled trained pair (models/arithmetic),
# build its engines (onnxruntime, and OpenVINO in bf16 on a CPU with AMX or AVX512_BF16, else fp32,
# where OpenVINO is installed), time them and use the faster, answer a test problem with APD (each
# step's accepted chunk in its own colour), then compare APD with one-token-per-step and
# K-tokens-per-step decoding.
# The bundle is reused while its checkpoints, the exporting code and the tools are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
APD=.venv/bin/apd-deploy
BUNDLE=${BUNDLE:-out/arithmetic-bundle}
SOURCES=(models/arithmetic apd_deploy export engines pyproject.toml)
# The candidates: onnxruntime, and OpenVINO in the best precision this CPU has, where it is installed.
read -r BACKEND PRECISION < <(.venv/bin/python -c "from apd_deploy.engines.build import fastest_cpu_engine; print(*fastest_cpu_engine())")
CANDIDATES=(onnxruntime-cpu-fp32)
[ "$BACKEND" = openvino ] && CANDIDATES+=("openvino-cpu-$PRECISION")
if .venv/bin/python scripts/bundle_stamp.py check "$BUNDLE" "${SOURCES[@]}"; then
  echo "reusing $BUNDLE (its sources are unchanged)"
else
  rm -f "$BUNDLE.stamp"  # stamped again only once the export succeeds
  echo "exporting the bundled pair (models/arithmetic) to $BUNDLE: about a minute"
  "$APD" export --dllm models/arithmetic/dllm --verifier models/arithmetic/verifier -o "$BUNDLE" --overwrite
  .venv/bin/python scripts/bundle_stamp.py write "$BUNDLE" "${SOURCES[@]}"
fi
for ENGINE in "${CANDIDATES[@]}"; do
  if ! .venv/bin/python -c "import json, sys; sys.exit(sys.argv[2] not in json.load(open(sys.argv[1])).get('engines', {}))" \
      "$BUNDLE/manifest.json" "$ENGINE"; then
    echo "building the $ENGINE engine: a few seconds"
    IFS=- read -r B _ P <<< "$ENGINE"
    "$APD" build-engine "$BUNDLE" --backend "$B" --precision "$P" --quiet
  fi
done
echo "timing ${CANDIDATES[*]} on 8 test problems ..."
ENGINE=$(.venv/bin/python scripts/fastest_engine.py "$BUNDLE" "${CANDIDATES[@]}")
echo "engine: $ENGINE (the fastest here on this pair; see docs/engines.md)"
QUESTION=$(.venv/bin/python -c "from apd_deploy.tasks.arithmetic import problems; print(next(problems('test')).question)")
echo "Q: $QUESTION"
"$APD" generate "$BUNDLE" --engine "$ENGINE" --chat --prompt "$QUESTION" --max-new-tokens 32
"$APD" eval "$BUNDLE" --engine "$ENGINE" --n "${N:-100}" --algs apd,leftright:1,leftright:4,leftright:8,ar
