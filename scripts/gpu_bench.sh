#!/usr/bin/env bash
# The README's GPU figures, on a machine with an NVIDIA GPU, onnxruntime-gpu and cupy:
#   bash scripts/gpu_bench.sh [WORK] [RESULTS]        (PAIRS="30m:fp32" to bench one pair only)
# 1. scripts/gpu_check.py: every backend's tokens against the CPU at T=0 (tiny random pair);
# 2. the 30m random pair in fp32 and the 600m one in fp16: export, CUDA engine, scripts/bench_gpu.py
#    (exact-size calls vs fixed shapes vs CUDA graphs, and the PyTorch-eager loop on the same GPU).
# Each stage has its own time limit, so that one that hangs still leaves the others' figures.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${1:-out/gpu}
RESULTS=${2:-$WORK}
mkdir -p "$WORK" "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/gpu.txt"

timeout 100 python3 "$HERE/gpu_check.py" --work "$WORK/check" 2>&1 | tee "$RESULTS/gpu_check.txt"

pair() {  # pair PRESET DTYPE LIMIT_S
  local preset=$1 dtype=$2 limit=$3
  timeout "$limit" bash -c "
    set -e
    apd-deploy make-tiny '$WORK/$preset' --preset $preset --overwrite
    apd-deploy export --dllm '$WORK/$preset/dllm' --verifier '$WORK/$preset/verifier' -o '$WORK/$preset-$dtype' --dtype $dtype --overwrite --quiet
    apd-deploy build-engine '$WORK/$preset-$dtype' --backend onnxruntime --device cuda --precision $dtype --quiet
    echo \"$preset $dtype: bundle ready after \$SECONDS s\"
    python3 '$HERE/bench_gpu.py' '$WORK/$preset-$dtype' --engine onnxruntime-cuda-$dtype --json '$RESULTS/bench-$preset-$dtype.json'
  " 2>&1 | tee "$RESULTS/bench-$preset-$dtype.txt"
}
for spec in ${PAIRS:-30m:fp32 600m:fp16}; do
  case $spec in
    30m:*) pair 30m "${spec#*:}" 240 ;;
    *) pair "${spec%%:*}" "${spec#*:}" 330 ;;
  esac
done
