#!/usr/bin/env bash
# The GPU checks in one go, for the day a GPU is lent (issue 16): bf16-vs-fp32 logits parity at a
# Llama-3.2-1B shape, align-step MFU at 1B and 3B shapes, decode tokens/s vs the HBM roofline,
# peak device memory vs the fit check. Prints one summary block; ~5 minutes on an H200.
#
#   bash bench/gpu_suite.sh              # from the repository root, on a GPU machine
#   bash bench/gpu_suite.sh --dry-run    # on CPU: the same code paths at toy shapes
#
# Never run by the tests. Exits nonzero, saying why, when no GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ " $* " != *" --dry-run "* ]]; then
  # Fail fast and clearly: a CPU-only JAX would otherwise time out on 1B shapes.
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_suite: no NVIDIA GPU visible (nvidia-smi missing or failing); use --dry-run on CPU" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  # The suite measures one chip; XLA's default preallocation would hide the peak it reports.
  export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
fi
exec python bench/gpu_suite.py "$@"
