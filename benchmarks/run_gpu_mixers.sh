#!/usr/bin/env bash
# The token-mixer work (issue #5) that is waiting for a GPU, in one device call (carry .whl for fla):
#   OUT=$OUT bash benchmarks/run_gpu_mixers.sh
# Each step has its own time cap and writes its log to $OUT/<step>.log; a failing or timed-out step does not stop
# the rest. The whole run stays under TOTAL_S seconds (default 560, inside the device tool's 600 s per command).
# Steps, most needed first:
#   1. block-sparse attention: the GPU tests, then the check + timing against SDPA at T=32768 (10%/20% blocks);
#   1b. the vector-gate (GLA) linear attention tests on the GPU;
#   2. linear attention at T=8192 and 32768 beside fla (the earlier run's time limit cut these rows);
#   3. fft_conv's kernel sweep at N=8192 (precision, pair vs one row, block, stages), for the next design step;
#   4. tilewise bench mixers (JSON into $OUT), if time is left.
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

step bsa-tests 120 $PY -m pytest -q -p no:benchmark -rfE --tb=short tests/ops/test_block_sparse_attention.py
step gla-tests 90 $PY -m pytest -q -p no:benchmark -rfE --tb=short -k vector tests/ops/test_linear_attention.py
step bsa-bench 150 $PY benchmarks/gpu_block_sparse_attention.py
step la-bench 120 $PY benchmarks/gpu_linear_attention.py --skip-check --seqlens 8192 32768
step fft-sweep 90 $PY benchmarks/gpu_fft_conv.py --no-check --sweep-n 8192 --n 8192
step bench-mixers 150 $PY -m tilewise bench mixers --json "$OUT/bench_mixers.json"

echo
echo "=== run_gpu_mixers.sh: $(($(date +%s) - START))s of ${TOTAL_S}s; logs in $OUT"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
