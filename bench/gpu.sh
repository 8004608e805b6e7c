#!/usr/bin/env bash
# On a GPU machine, from the source tree (no install needed): the GPU tests,
# then the GPU benchmark, and a short summary last. Writes logs, JSON and
# Markdown to $OUT (the device tool's output folder) or bench-results/.
#   bash bench/gpu.sh            # everything
#   QUICK=1 bash bench/gpu.sh    # benchmark without the 1B-parameter case
# Each phase has a wall-clock cap (TESTS_MAX_S, BENCH_MAX_S seconds) so that a
# short device lease still brings back the logs of what ran.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-bench-results}"
mkdir -p "$out"
t0=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m fusedopt build cuda triton 2>&1 | tail -n 20 || echo "BUILD FAILED"
python3 -m fusedopt info 2>&1 | tail -n 12
echo "build: $((SECONDS - t0)) s"

# The tests in parallel where pytest-xdist is installed (Triton's JIT compiles
# on the CPU; the GPU is mostly idle), each capped where pytest-timeout is,
# with 2 CPU threads per worker: the references of the bit-exact tests run on
# the CPU, and 8 workers of 16 threads each took the H200 machine 10x longer.
par=()
python3 -c "import xdist" 2>/dev/null && par+=(-n "${TEST_WORKERS:-8}")
python3 -c "import pytest_timeout" 2>/dev/null && par+=(--timeout 300)
t1=$SECONDS
OMP_NUM_THREADS=${TEST_THREADS:-2} timeout "${TESTS_MAX_S:-3600}" python3 -m pytest -q -m gpu tests -p no:cacheprovider -rfE --tb=short \
  --junitxml="$out/gpu-tests.xml" "${par[@]}" > "$out/gpu-tests.log" 2>&1
tests_rc=$?
tail -n 25 "$out/gpu-tests.log"
echo "tests: $((SECONDS - t1)) s"

cases=()
[ "${QUICK:-0}" = 1 ] && cases=(--case 1x10M 200x50K gpt2-124M)
t2=$SECONDS
timeout "${BENCH_MAX_S:-3600}" python3 -m fusedopt bench --device cuda --bench adamw states fp8 second_order remainder --check \
  --out "$out" "${cases[@]}" > "$out/gpu-bench.log" 2>&1
bench_rc=$?
tail -n 45 "$out/gpu-bench.log"
echo "bench: $((SECONDS - t2)) s"
n_gpus=$(nvidia-smi -L | wc -l)
if [ "$n_gpus" -ge 2 ]; then  # ZeRO stage 2 against DDP on NCCL (issue 6)
  python3 bench/zero.py --time "$n_gpus" 2>&1 | tee "$out/zero-ddp.log" | tail -n 4
fi
echo
echo "== summary =="
grep -E "^(PASS|MISS)" "$out/gpu-bench.log" || true
echo "gpu tests: $(tail -n 1 "$out/gpu-tests.log") (exit $tests_rc); bench exit $bench_rc; $((SECONDS - t0)) s in all"
exit $(( tests_rc != 0 || bench_rc != 0 ))
