#!/usr/bin/env bash
# One prepared device run (issue 13), on a machine with one NVIDIA GPU and the stock PyTorch /
# transformers stack; under 8 minutes on one H200:
#   (a) the device tests: every library phase on the device in fp32, bf16 and fp16 on tiny models,
#       bit-exact restores there, CPU vs device scores within their tolerances, and `device:` through
#       the Snakemake DAG on a tiny model directory (tests/test_device.py, ESA_TEST_DEVICE);
#   (b) every phase on the Llama-3.1-8B-shaped model, 32 layers in bf16: peak memory and wall time,
#       tokens per second forward and forward + backward, MFU (bench/gpu_check.py);
#   (c) one JSON: OUT/gpu_check.json (the test counts included).
# `--cpu-smoke` runs the same on the CPU at tiny shapes (CI runs it, so this script cannot rot).
#   bash bench/gpu_check.sh [--cpu-smoke] [OUT]        (OUT: default gpu_check/)
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=()
DEVICE=cuda
if [ "${1:-}" = "--cpu-smoke" ]; then
    SMOKE=(--cpu-smoke)
    DEVICE=cpu
    shift
fi
OUT="${1:-gpu_check}"
mkdir -p "$OUT"
status=0
# the cuBLAS workspace is chosen at its first call: set for the deterministic-kernels test
ESA_TEST_DEVICE="$DEVICE" CUBLAS_WORKSPACE_CONFIG=:4096:8 python -m pytest -q -n 0 -p no:cacheprovider -m device tests/test_device.py \
    --junitxml "$OUT/tests.xml" || status=$?
python bench/gpu_check.py "${SMOKE[@]}" --tests "$OUT/tests.xml" --out "$OUT/gpu_check.json"
echo "gpu_check: $OUT/gpu_check.json (device tests exit status $status)"
exit "$status"
