#!/usr/bin/env bash
# One device call on a CUDA machine: build the kernels (sm_90 unless SAFEFLOW_CUDA_ARCH says
# otherwise), run the kernel tests there, then the GPU benchmarks. Logs and JSON go to $OUT.
# Usage (from the repository root): OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/safeflow-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD SAFEFLOW_CUDA_ARCH=${SAFEFLOW_CUDA_ARCH:-90} SAFEFLOW_REQUIRE_EXT=1
export SAFEFLOW_BENCH_OUT=$OUT
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nproc; lscpu | grep 'Model name';
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
start=$SECONDS
timeout 110 python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - start)) s"
python3 -c "import safeflow; print('kernels:', safeflow.available()['kernel'])"
timeout ${TEST_TIMEOUT:-75} python3 -m pytest -q -p no:cacheprovider -m "not integration" tests/test_kernels.py tests/test_cuda_steering.py 2>&1 | tee "$OUT/tests.log" | tail -25
timeout ${BENCH_TIMEOUT:-80} python3 -m pytest -q -p no:cacheprovider -k "${BENCH_K:-gpu}" benchmarks/test_bench_kernels.py \
    benchmarks/test_bench_gpu_extraction.py --benchmark-enable --benchmark-columns=median,iqr,rounds \
    --benchmark-json="$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -45
cat "$OUT/gpu_llama_shape.json" 2>/dev/null
