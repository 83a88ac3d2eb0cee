#!/usr/bin/env bash
# The token-mixer work (issue #5) that is waiting for a GPU, in one device call (carry .whl for fla):
#   OUT=$OUT bash benchmarks/run_gpu_mixers.sh
# Each step has its own time cap and writes its log to $OUT/<step>.log; a failing or timed-out step does not stop
# the rest. The whole run stays under TOTAL_S seconds (default 560, inside the device tool's 600 s per command).
# Steps, most needed first:
#   1. the GPU tests of fft_conv, linear attention and block-sparse attention;
#   2. fft_conv timings at N = 4096, 8192 (with and without the skip term), then the two-pass launch sweep;
#   3. tilewise bench mixers at T=2048 and T=8192, each alone with a long cap (with fla carried, fla's autotuning
#      and FlexAttention's compile took 150-300 s a process in the 2026-11-23 sessions; without .whl the fla rows
#      say "missing" and a process takes ~60 s). At T=2048 the host-bound rows move up to 2x between processes:
#      run it more than once before quoting it (BENCHMARKS.md's current table gives the range).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

export PYTHONUNBUFFERED=1
unset TILEWISE_BACKEND TRITON_INTERPRET
OUT="${OUT:-runs/gpu-mixers-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
TOTAL_S="${TOTAL_S:-560}"
START=$(date +%s)
PY="${PY:-python3}"
SITE="${SITE:-/tmp/site}"
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl &&
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

SUMMARY=()
# step NAME CAP_S CMD...: run CMD for at most min(CAP_S, the time left), its output into $OUT/NAME.log
step() {
  local name=$1 cap=$2 left limit rc
  shift 2
  left=$((TOTAL_S - ($(date +%s) - START)))
  limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    SUMMARY+=("$name: skipped (time budget)")
    return
  fi
  echo "=== $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$name.log"
  SUMMARY+=("$name: rc $rc")
}

step gpu-tests 200 $PY -m pytest -q -p no:benchmark -rfE --tb=short -n 6 -m gpu \
  tests/ops/test_fft_conv.py tests/ops/test_linear_attention.py tests/ops/test_block_sparse_attention.py
step fft-time 150 $PY benchmarks/gpu_fft_conv.py --no-sweep --no-check --n 4096 8192
step fft-sweep 150 $PY benchmarks/gpu_fft_conv_sweep.py --two-pass --jobs 14 --bk 64 128 --n2 64 --warps 4 8 \
  --stages 1 2 --bk2 32 64 --bm 64 --pairs 4 8 --dtype fp32
step bench-mixers-2k 240 $PY -m tilewise bench mixers --seqlens 2048 --json "$OUT/bench_mixers_2048.json"
step bench-mixers 240 $PY -m tilewise bench mixers --seqlens 8192 --json "$OUT/bench_mixers.json"

echo
echo "=== run_gpu_mixers.sh: $(($(date +%s) - START))s of ${TOTAL_S}s; logs in $OUT"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
