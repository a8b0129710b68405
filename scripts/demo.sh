#!/usr/bin/env bash
# The main job, offline, from a fresh clone: export the bundled trained pair (models/arithmetic),
# build the fastest engine this machine has (OpenVINO in bf16 on a CPU with AMX or AVX512_BF16,
# else OpenVINO in fp32, else onnxruntime), answer a test problem with APD (each step's accepted
# chunk in its own colour), then compare APD with one-token-per-step and K-tokens-per-step decoding.
# The bundle is reused while its checkpoints, the exporting code and the tools are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
APD=.venv/bin/apd-deploy
BUNDLE=${BUNDLE:-out/arithmetic-bundle}
SOURCES=(models/arithmetic apd_deploy export engines pyproject.toml)
read -r BACKEND PRECISION < <(.venv/bin/python -c "from apd_deploy.engines.build import fastest_cpu_engine; print(*fastest_cpu_engine())")
ENGINE=$BACKEND-cpu-$PRECISION
if .venv/bin/python scripts/bundle_stamp.py check "$BUNDLE" "${SOURCES[@]}"; then
  echo "reusing $BUNDLE (its sources are unchanged)"
else
  rm -f "$BUNDLE.stamp"  # stamped again only once the export succeeds
  echo "exporting the bundled pair (models/arithmetic) to $BUNDLE: about a minute"
  "$APD" export --dllm models/arithmetic/dllm --verifier models/arithmetic/verifier -o "$BUNDLE" --overwrite
  .venv/bin/python scripts/bundle_stamp.py write "$BUNDLE" "${SOURCES[@]}"
fi
if ! .venv/bin/python -c "import json, sys; sys.exit(sys.argv[2] not in json.load(open(sys.argv[1])).get('engines', {}))" \
    "$BUNDLE/manifest.json" "$ENGINE"; then
  echo "building the $ENGINE engine (the fastest this machine has): a few seconds"
  "$APD" build-engine "$BUNDLE" --backend "$BACKEND" --precision "$PRECISION" --quiet
fi
echo "engine: $ENGINE (the fastest this machine has; see README, Engines)"
QUESTION=$(.venv/bin/python -c "from apd_deploy.tasks.arithmetic import problems; print(next(problems('test')).question)")
echo "Q: $QUESTION"
"$APD" generate "$BUNDLE" --engine "$ENGINE" --chat --prompt "$QUESTION" --max-new-tokens 32
"$APD" eval "$BUNDLE" --engine "$ENGINE" --n "${N:-100}" --algs apd,leftright:1,leftright:4,leftright:8,ar
