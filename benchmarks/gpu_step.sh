#!/usr/bin/env bash
# The training step at SD 2.1-base shapes, 512 px, batch 8, bfloat16, on one GPU, with cuDNN
# attention on ("cudnn") and off ("xla": materialised; "blockwise": plain-JAX flash), against
# the PyTorch reference (autocast bfloat16, SDPA). Prints step times, `ratio pytorch/jax`, MFU
# from the step's model FLOPs against the GPU's peak, and the 512 px UNet backward memory table
# (each attention implementation, float32 and bfloat16, model.remat off and on: 12 compiles;
# GPU_STEP_MEMORY=none skips it).
# Needs jax[cuda] and a CUDA build of torch. About 10-15 minutes on one H100/H200 (not yet run).
set -euo pipefail
cd "$(dirname "$0")/.."
# PyTorch shares the GPU: no JAX preallocation of 75% of its memory.
export JAX_PLATFORMS=cuda PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} XLA_PYTHON_CLIENT_PREALLOCATE=false
common=(--size sd21 --device cuda --resolution 512 --batch 8 --dtype bfloat16 --repeats 10)
# cuDNN beside PyTorch, then blockwise (JAX only) in the same process; `--memory auto` adds the
# 12-compile UNet memory table (GPU_STEP_MEMORY=none skips it: about 5 minutes less).
python3 benchmarks/step_bench.py "${common[@]}" --attention cudnn,blockwise \
  --memory "${GPU_STEP_MEMORY:-auto}"
