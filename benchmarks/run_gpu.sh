#!/usr/bin/env bash
# Everything tilewise checks and measures on the lent GPU machine, in one call (carry .whl for the peers):
#   bash benchmarks/run_gpu.sh
# Steps: install the peer wheels from .whl/ into $SITE (/tmp/site); `tilewise env`; the test suite (kernel tests --
# `gpu` and `interpret` marks, which run the Triton kernels on the real GPU there -- then the rest);
# benchmarks/gpu_blockquant.py and benchmarks/gpu_hadamard.py when present; `tilewise bench quant` and
# `tilewise bench hadamard` and `tilewise bench mixers` with --json. A failing step does not stop the run: each
# step's status is printed at the end, after the bench tables. Logs and JSON go to $OUT (default
# runs/gpu-<time>): run_gpu.log, bench_quant.json, bench_hadamard.json, bench_mixers.json, summary.txt.
# Time: every step has a cap, the bench steps keep BENCH_RESERVE_S seconds for themselves (they took ~65 s on an
# H100, torchao compiling included; mixers, new, gets what they leave: at least 120 s), and the run
# stays under TOTAL_S seconds (default 560), inside the device tool's 600 s per command.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

export PYTHONUNBUFFERED=1
unset TILEWISE_BACKEND TRITON_INTERPRET  # auto = Triton on CUDA tensors; tests pick backends themselves
OUT="${OUT:-runs/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
LOG="$OUT/run_gpu.log"
: >"$LOG"
TOTAL_S="${TOTAL_S:-560}"
BENCH_RESERVE_S="${BENCH_RESERVE_S:-260}"
START=$(date +%s)
PY="${PY:-python3}"
SITE="${SITE:-/tmp/site}"
export PY SITE
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

STEPS=()
STATUS=()
SECONDS_TAKEN=()

# step NAME CAP_S RESERVE_AFTER_S CMD...: run CMD with a timeout of min(CAP_S, time left - RESERVE_AFTER_S), its
# output appended to the log and shown; records "ok", "FAIL (rc N)", "TIMEOUT (N s)" or "skipped (...)".
step() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  local now left limit rc t0
  now=$(date +%s)
  left=$((TOTAL_S - (now - START) - reserve))
  limit=$((cap < left ? cap : left))
  STEPS+=("$name")
  if ((limit < 5)); then
    STATUS+=("skipped (time budget)")
    SECONDS_TAKEN+=(0)
    echo "=== $name: skipped, ${left}s left of the budget" | tee -a "$LOG"
    return
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  t0=$(date +%s)
  # SIGINT first: pytest then prints its summary of what failed before the limit
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=$?
  SECONDS_TAKEN+=($(($(date +%s) - t0)))
  if ((rc == 0)); then
    STATUS+=("ok")
  elif ((rc == 124 || rc == 137)); then
    STATUS+=("TIMEOUT (${limit}s)")
  else
    STATUS+=("FAIL (rc $rc)")
  fi
  echo "=== $name: ${STATUS[-1]} in ${SECONDS_TAKEN[-1]}s" | tee -a "$LOG"
}

skip() {
  STEPS+=("$1")
  STATUS+=("skipped ($2)")
  SECONDS_TAKEN+=(0)
  echo "=== $1: skipped ($2)" | tee -a "$LOG"
}

install_peers() {
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
}

machine() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no .git here)')"
  $PY -m tilewise env
}
export -f install_peers machine  # `timeout` runs programs, so the functions run in `bash -c`

if compgen -G ".whl/*.whl" >/dev/null; then
  step install-peers 90 "$BENCH_RESERVE_S" bash -c install_peers
  [[ ${STATUS[-1]} == ok ]] && export PYTHONPATH="$SITE:$PYTHONPATH"
else
  skip install-peers "no .whl/*.whl"  # ../shared/tools/peer-wheels.sh fills it; name .whl in carry
fi
step env 60 "$BENCH_RESERVE_S" bash -c machine
step tests-kernels 150 "$BENCH_RESERVE_S" $PY -m pytest -q -m "gpu or interpret" tests
step tests-rest 90 "$BENCH_RESERVE_S" $PY -m pytest -q -m "not gpu and not interpret" tests
for script in gpu_blockquant gpu_hadamard; do
  if [[ -f benchmarks/$script.py ]]; then
    step "$script" 75 "$BENCH_RESERVE_S" $PY "benchmarks/$script.py"
  else
    skip "$script" "no benchmarks/$script.py"
  fi
done
step bench-quant 140 160 $PY -m tilewise bench quant --json "$OUT/bench_quant.json"
step bench-hadamard 60 120 $PY -m tilewise bench hadamard --json "$OUT/bench_hadamard.json"
step bench-mixers 140 0 $PY -m tilewise bench mixers --json "$OUT/bench_mixers.json"

{
  for suite in quant hadamard mixers; do
    echo
    echo "=== tilewise bench $suite"
    if [[ -s $OUT/bench_$suite.json ]]; then
      $PY -c 'import json, sys; from tilewise.bench import format_table; print(format_table(json.load(open(sys.argv[1]))))' \
        "$OUT/bench_$suite.json" 2>&1
    else
      echo "(no $OUT/bench_$suite.json: see the bench-$suite step in $LOG)"
    fi
  done
  echo
  echo "=== run_gpu.sh steps ($(($(date +%s) - START))s of ${TOTAL_S}s; log: $LOG)"
  printf '%-16s %-34s %7s\n' step status seconds
  failed=0
  for i in "${!STEPS[@]}"; do
    printf '%-16s %-34s %7s\n' "${STEPS[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}"
    # a step skipped for want of time counts as not ok; one whose script does not exist yet does not
    [[ ${STATUS[$i]} == ok || (${STATUS[$i]} == skipped* && ${STATUS[$i]} != *"time budget"*) ]] ||
      failed=$((failed + 1))
  done
  echo "steps not ok: $failed"
} | tee "$OUT/summary.txt" | tee -a "$LOG"
grep -q '^steps not ok: 0$' "$OUT/summary.txt"
