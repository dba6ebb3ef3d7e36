#!/usr/bin/env bash
# The checks to run when a GPU is lent (prepared; not yet run on a GPU), meant to fit 10 minutes on one
# H100/H200.
#   1. the fused GPU attention (pallas_gpu, lowered by Triton) against the XLA reference on the GPU:
#      values and gradients, three layouts, GQA and MHA, a row of padding only;
#   2. the Llama-3.2-1B-shaped bfloat16 ASFT step at length 2048 (random weights, synthetic pairs):
#      tokens/s and MFU against the chip's dense bf16 peak;
#   3. the device's measured peak (memory_stats) beside XLA's prediction for the same compiled step
#      (memory_analysis, what `asft compile` reports): bench_train's "device MiB" and "compiled MiB".
# Needs the package installed with a CUDA jax (pip install -e . "jax[cuda12]"); OUT: where the JSON goes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}
ASFT_TEST_PLATFORM=gpu python -m pytest -q -n 0 -p no:cacheprovider tests/model/test_attention.py -k fused_kernels
python benchmarks/bench_train.py --shape llama-3.2-1b --synthetic --max-length 2048 --pairs 8 --dtype bfloat16 \
  --objectives asft --layouts packed_shared_prefix packed --steps 5 --json "$out/gpu_bench_1b.json"
