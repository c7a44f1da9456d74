#!/usr/bin/env bash
# The benchmarks and numerics tests on a GPU machine, in under 8 minutes; JSON results in $OUT.
#
#   pip install -e ".[test,hf]" "jax[cuda12]"     # once, on the GPU machine
#   experiments/gpu_check.sh [OUT]                # or: make gpu-check
#
# Runs, each under its own time limit (a step that fails or runs over is reported and the
# rest still run): the FP8 GEMM benchmark (time, error and compiled memory of FP8 vs BF16/FP32
# dots at DeepSeek-V3 shapes), the train-step and prefill/decode benchmarks on the `bench`
# model (without the transformers peer: the CPU torch wheel cannot run there), then the
# numerics tests (FP8 quantization and dots, MLA/RoPE/MoE/MTP layers, HF parity) on the GPU.
# Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
PY=${PYTHON:-python}
mkdir -p "$OUT"
status=0

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - t0))s"
  else
    echo "   FAILED (exit $?) after $((SECONDS - t0))s; last lines of $OUT/$name.log:"
    tail -15 "$OUT/$name.log" | sed 's/^/   /'
    status=1
  fi
}

"$PY" -c "import jax; print('devices:', jax.devices())" | tee "$OUT/devices.txt"
step fp8_gemm 90 "$PY" -m experiments.benchmark_fp8_gemm --out="$OUT/benchmark_fp8_gemm.json"
# --precisions=: the bf16 and fp8 re-runs of the step (two more compiles) would not fit the limit.
step train 150 "$PY" -m experiments.benchmark_train --nopeer --precisions= \
  --out="$OUT/benchmark_train.json"
# MTP speculation compiles a drafter and a verifier per batch size: over two minutes on an
# H200, so it is left to the CPU runs here.
step decode 120 "$PY" -m experiments.benchmark_decode --nopeer --nospeculative \
  --decode_batches=1,8,32 --out="$OUT/benchmark_decode.json"
# The test suite pins JAX to the CPU unless told otherwise; these tests use no mesh. One
# process compiles ~60 of these tests in 200 s on an H200 (compilation is host work), so
# they run in 8 processes sharing the GPU, each allocating only what it uses; -v names each
# test's outcome in the log as it finishes, so a run cut by its limit still says what passed.
step numerics 240 env JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" -m pytest \
  -v -n 8 -m "not slow" -p no:cacheprovider -rf --tb=short tests/quant tests/layers \
  tests/checkpoint/test_hf_parity.py --junitxml="$OUT/numerics.xml"
echo "results in $OUT"
exit $status
