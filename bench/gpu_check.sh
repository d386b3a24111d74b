#!/usr/bin/env bash
# One call on the GPU machine (torch 2.11, triton 3.6, nvcc 13.0, no package registry): build the
# extension from source, run the whole test suite (the `cuda` tests included) and the benchmark,
# and leave the log (environment, build errors, tests, benchmark) and the results under $OUT, at
# most eight files: what the device tool brings back.
#   device run: bash bench/gpu_check.sh
#   narrower:   TESTS="tests -m cuda" BENCH="bench.op --tensor 'ViT-B/16 tokens'" bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
TESTS=${TESTS:-tests}
BENCH=${BENCH:-bench}

stamp() { echo "== $1 $(date -u +%Y-%m-%dT%H:%M:%SZ)" | tee -a "$LOG"; }

stamp start
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -2
  python -m pip list 2>/dev/null | grep -iE "^(pytest|hypothesis|timm|numpy|ninja|setuptools) " || true
} 2>&1 | tee -a "$LOG"

python -m pip install --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1
status=$?
stamp "build rc=$status"
[ $status -eq 0 ] || tail -60 /tmp/build.log | tee -a "$LOG"

eval "timeout ${TESTS_TIMEOUT:-0} python -m pytest $TESTS -q -p no:cacheprovider -p no:warnings -rfs --durations=15" 2>&1 | tee -a "$LOG" | tail -30
stamp "tests done: $TESTS"

eval "timeout ${BENCH_TIMEOUT:-0} python -m $BENCH --output $OUT/op.json" 2>&1 | grep -v "^W" | tee -a "$LOG" | tail -60
stamp "bench done: $BENCH"
