#!/usr/bin/env bash
# Every GPU benchmark and GPU-only test of s2q-jax in one run (≈ 8 minutes on one H100/H200).
#
#   bash benchmarks/run_gpu.sh            # from the repository root; results in benchmarks/results/
#
# Needs jax with CUDA (0.10 or 0.11) and numpy. The kernel benchmark and kernel tests need
# nothing else. The full-transformer benchmark also needs flax, safetensors, einops and
# ml_collections; where one is missing that step is skipped with a message (install them, or
# carry wheels and `pip install --no-deps wheels/*.whl` first: flax's own dependencies are
# then needed too). pytest is optional (the GPU tests are skipped without it).
# Each step has its own time limit, so one slow step cannot use up the others' time.
set -u
cd "$(dirname "$0")/.."
OUT=benchmarks/results
mkdir -p "$OUT"
STAMP=$(date -u +%Y-%m-%d)
DEVICE=$(python -c "import jax; d = jax.devices()[0]; print(d.device_kind.replace(' ', '-'))")
export S2Q_AUTOTUNE_CACHE="$OUT/autotune_${DEVICE}_${STAMP}.json"  # what `auto` measured
echo "device: $DEVICE"
python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT, never abort the run
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/${name}_${DEVICE}_${STAMP}.log"
  echo "=== $name: exit ${PIPESTATUS[0]}"
}

# 1. GPU correctness first: the Triton and Mosaic-GPU kernels against the reference at model sizes
#    (tests/conftest.py defaults JAX_PLATFORMS to cpu).
if python -c "import pytest" 2>/dev/null; then
  step gpu_tests 150 env JAX_PLATFORMS=cuda python -m pytest -q -m "gpu" -p no:cacheprovider \
    tests/test_mosaic_gpu.py tests/test_kernels.py -k "kernel_equals_reference and not float32"
else
  echo "pytest missing: GPU tests skipped"
fi

# 2. Kernels at CogVideoX-2B/5B shapes: bf16, quantization alone, the norm + modulation with and
#    without the quantization fused in, XLA int8, Triton, Mosaic GPU and auto.
step kernels 240 python -m pallas_kernels.benchmark --shapes cogvideox \
  --backends gpu,mosaic_gpu,auto --reps 20 --json "$OUT/kernels_${DEVICE}_${STAMP}.json"

# 3. One CogVideoX-2B forward at 49×480×720 (17,776 tokens): bf16 against deployed W4A6,
#    activation quantization fused and unfused.
if python -c "import flax, safetensors, einops, ml_collections" 2>/dev/null; then
  step transformer 240 python -m s2q_jax.benchmark --preset cogvideox-2b \
    --backends xla_int8,mosaic_gpu --unfused --reps 3 \
    --json "$OUT/transformer_cogvideox-2b_${DEVICE}_${STAMP}.json"
else
  echo "flax / safetensors / einops / ml_collections missing: transformer benchmark skipped"
fi
ls -l "$OUT"
