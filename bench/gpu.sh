#!/usr/bin/env bash
# On a GPU machine, from the source tree (no install needed): the GPU tests,
# then the GPU benchmark, and a short summary last. Writes JSON/Markdown to
# $OUT (the device tool's output folder) or bench-results/.
#   bash bench/gpu.sh            # everything
#   QUICK=1 bash bench/gpu.sh    # benchmark without the 1B-parameter case
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-bench-results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m fusedopt info
python3 -m fusedopt build cuda triton || echo "BUILD FAILED"
python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" | tail -n 25
tests_rc=${PIPESTATUS[0]}
cases=()
[ "${QUICK:-0}" = 1 ] && cases=(--case 1x10M 200x50K gpt2-124M)
python3 -m fusedopt bench --device cuda --bench adamw states fp8 second_order --out "$out" "${cases[@]}" 2>&1 | tee "$out/gpu-bench.log" | tail -n 45
bench_rc=${PIPESTATUS[0]}
n_gpus=$(nvidia-smi -L | wc -l)
if [ "$n_gpus" -ge 2 ]; then  # ZeRO stage 2 against DDP on NCCL (issue 6)
  python3 bench/zero.py --time "$n_gpus" 2>&1 | tee "$out/zero-ddp.log" | tail -n 4
fi
echo
echo "== summary =="
grep -E "^(PASS|MISS)" "$out/gpu-bench.log" || true
echo "gpu tests: $(tail -n 1 "$out/gpu-tests.log") (exit $tests_rc); bench exit $bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
