#!/usr/bin/env bash
# The GPU check, one call on the GPU machine: the build (sm_90 only) and then the phases of
# bench/gpu_check.py, each under its own time limit, 540 s in all; the log and results under $OUT.
#   device run: bash bench/gpu_check.sh              (every phase)
#   rerun:      bash bench/gpu_check.sh unverified   (the environment and the build, then that phase)
set -uo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
exec "${PYTHON:-python3}" -m bench.gpu_check --out "${OUT:-/tmp/gpu_check}" "$@"
