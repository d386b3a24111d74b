#!/usr/bin/env bash
# One call on the GPU machine (torch 2.11, triton 3.6, nvcc 13.0, no package registry): build the
# extension from source, run the whole test suite (the `cuda` tests included) and the benchmark,
# and leave logs and results under $OUT.
#   device run: bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -2
  python -m pip list 2>/dev/null | grep -iE "^(pytest|hypothesis|timm|numpy|ninja|setuptools) " || true
} 2>&1 | tee "$OUT/environment.txt"

python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
echo "build rc=$?" | tee -a "$OUT/environment.txt"

python -m pytest tests -q -p no:cacheprovider -p no:warnings -rfs --durations=10 2>&1 | tee "$OUT/tests.log" | tail -30

python -m bench --output "$OUT/op.json" 2>&1 | grep -v "^W" | tee "$OUT/bench.log" | tail -40
