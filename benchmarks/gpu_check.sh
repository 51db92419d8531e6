#!/usr/bin/env bash
# GPU check: the kernel tests compiled (not interpreted) on the GPU, the attention backends checked and timed,
# then gmm and the MoE layer timed against ragged_dot and dense matmuls of equal FLOPs. Fits in about 10
# minutes on an H100/H200.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a machine with a GPU
#
# Needs jax with CUDA, flax, pytest and numpy (moejax itself is used from the checkout). Logs go to
# $OUT (or ./gpu_check_logs) as well as stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-gpu_check_logs}"
mkdir -p "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY="${PYTHON:-python3}"
status=0

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$LOG/device.txt"
"$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$LOG/device.txt"

echo "== kernel tests, compiled on the GPU (Mosaic TPU kernels are covered by the CPU interpret tests)"
timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "not pallas_tpu" 2>&1 | tee "$LOG/tests.txt" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== attention backends against the reference on the GPU (pallas_gpu compiled by Triton, blockwise)"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_attention.py -k "pallas_gpu or blockwise_matches" 2>&1 \
  | tee "$LOG/attention_tests.txt" | tail -8
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== attention fwd+bwd: reference vs blockwise vs Triton vs cuDNN (bf16; V3's MLA dims 192/128 at 4K)"
timeout 150 "$PY" -m benchmarks.attention --impls reference,blockwise,pallas_gpu,cudnn --dtype bfloat16 \
  --shapes 1x4096x16x192x128,4x2048x16x128x128 2>&1 | grep -v "^W0\|^I0" | tee "$LOG/attention.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== ~1B MoE (V2-Lite shapes, 2 layers) train step, bf16 and FP8 matmuls, 8 x 4096: tokens/s and MFU per attention backend"
timeout 300 "$PY" -m benchmarks.gpu_train --attention pallas_gpu,blockwise --precision bf16,fp8 2>&1 | grep -v "^W0\|^I0" \
  | tee "$LOG/gpu_train.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== gmm vs ragged_dot vs dense (bf16, float32 accumulation)"
timeout 220 "$PY" -m benchmarks.gmm_kernels --sweep --impls pallas_gpu,ragged_dot 2>&1 | grep -v "^W0\|^I0" | tee "$LOG/gmm.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== MoE layer forward + backward vs dense FFN of equal activated FLOPs (bf16 compute)"
timeout 150 "$PY" -m benchmarks.moe_layer --tokens 16384 --hidden 2048 --active-ffn 6144 --dtype bfloat16 \
  --configs 8x2,64x6,128x8 2>&1 | grep -v "^W0\|^I0" | tee "$LOG/moe_layer.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== gpu_check exit status $status"
exit $status
