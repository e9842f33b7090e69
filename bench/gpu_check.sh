#!/usr/bin/env bash
# One-shot check for a fresh GPU machine (torch and triton installed, no network), at most
# GPU_CHECK_BUDGET_S seconds (default 400, under 7 minutes) in all, most telling stage first,
# so that whatever cuts it short, what ran is kept:
#   1. build      the extension, required (a failed build is a failure, not a pure-Python install)
#   2. smoke      every fused kernel at the paper shape and a ragged one against the torch
#                 backend, and the registers/spills/shared memory the JIT really gave them
#   3. paper      the paper-setting benchmark (bf16, tf32, ieee; uniform and marginal;
#                 reference and the SDPA route beside the fused backends)
#   4. tests      pytest -m gpu with workers and a per-test timeout; -v so that every result
#                 is in the log as it happens and a cut-short run still counts what passed
#   5. memcheck   compute-sanitizer on one cuda and one triton case
#   6. grid       the rest of the GPU grid, with whatever time is left
#
#   bash bench/gpu_check.sh OUTDIR             # on the GPU machine (run from anywhere)
#   bash bench/gpu_check.sh OUTDIR --dry-run   # on a CPU: the same flow up to where a GPU is
#                                              # needed (stages that need CUDA say so)
#
# OUTDIR gets at most eight files: summary.txt, build.log, smoke.log, tests.log, memcheck.log,
# bench.log, paper.json, grid.json (render a json with `python -m bench.summary FILE`).
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 400).
set -u -o pipefail

if [[ $# -lt 1 || $# -gt 2 || ( $# -eq 2 && $2 != --dry-run ) ]]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR [--dry-run]" >&2
    exit 2
fi
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
DRY_RUN=$([[ ${2:-} == --dry-run ]] && echo 1 || echo 0)
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-400}
SUMMARY=$OUTDIR/summary.txt
export PYTHONUNBUFFERED=1
export ECLOSS_FAST_REQUIRE_EXTENSION=1
# The repository root on the path, for scripts run by file name.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Build only for the card in this machine (sm_90 on an H100/H200): half the compile time.
if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]] && arch=$("$PYTHON" -c \
        'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null); then
    export TORCH_CUDA_ARCH_LIST=$arch
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
WORKERS=$(($(nproc) < 8 ? $(nproc) : 8))

STAGES=()
# stage NAME CAP_SECONDS LOG COMMAND...: runs COMMAND with its output appended to OUTDIR/LOG,
# for at most CAP_SECONDS and never past the total budget; records the outcome for the table.
stage() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$((BUDGET_S - SECONDS))
    local limit=$((cap < left ? cap : left))
    if ((limit < 5)); then
        STAGES+=("$(printf '%-9s %-24s %5s s' "$name" "skipped: no time left" 0)")
        echo "== $name: skipped, no time left in the budget" >>"$OUTDIR/$log"
        return
    fi
    echo "== $name (limit ${limit} s): $*" | tee -a "$SUMMARY" >>"$OUTDIR/$log"
    local start=$SECONDS rc
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$OUTDIR/$log" 2>&1
    rc=$?
    local outcome="ok"
    if ((rc == 124 || rc == 137)); then
        outcome="TIMEOUT after ${limit} s"
    elif ((rc == 5)) && [[ $name == tests ]]; then
        outcome="FAILED: no tests ran"  # pytest's exit code 5
    elif ((rc != 0)); then
        outcome="FAILED (exit $rc)"
    fi
    STAGES+=("$(printf '%-9s %-24s %5s s' "$name" "$outcome" $((SECONDS - start)))")
    tail -n 4 "$OUTDIR/$log" | sed 's/^/   /' | tee -a "$SUMMARY"
}

skip_stage() {  # skip_stage NAME LOG REASON
    STAGES+=("$(printf '%-9s %-24s %5s s' "$1" "skipped" 0)")
    echo "== $1: skipped: $3" | tee -a "$OUTDIR/$2" >>"$SUMMARY"
}

# bench_json RUN_DIR NAME: keep a benchmark run's results.json as OUTDIR/NAME.json.
bench_json() {
    [[ -f $1/results.json ]] && mv "$1/results.json" "$OUTDIR/$2.json"
    rm -rf "$1"
}

{
    echo "gpu_check $(date -u +%FT%TZ) in $(pwd), dry run: $DRY_RUN, budget $BUDGET_S s"
    git log -1 --format='commit %H %s' 2>/dev/null
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
            --format=csv 2>&1
    else
        echo "nvidia-smi: not on the PATH"
    fi
    "$PYTHON" -m ecloss_fast 2>&1 || echo "python -m ecloss_fast failed"
    echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS workers=$WORKERS"
} >"$SUMMARY"
cat "$SUMMARY"

# A fresh GPU machine has no built extension (build outputs do not travel), so this builds;
# on a development machine an up-to-date in-place build is kept.
stage build 150 build.log "$PYTHON" setup.py build_ext --inplace

HAVE_CUDA=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if ((HAVE_CUDA)); then
    stage smoke 60 smoke.log "$PYTHON" -m bench.gpu_smoke --time-budget 45
    stage paper 90 bench.log "$PYTHON" -m bench --grid paper --out "$OUTDIR/paper" \
        --no-train-step --time-budget 75
    bench_json "$OUTDIR/paper" paper
else
    skip_stage smoke smoke.log "no CUDA device"
    skip_stage paper bench.log "no CUDA device"
fi

# Without CUDA every gpu test is skipped: the dry run checks collection and the runner flags.
TEST_ARGS=(-m gpu -v -p no:cacheprovider)
"$PYTHON" -c 'import xdist' 2>/dev/null && TEST_ARGS+=(-n "$WORKERS")
"$PYTHON" -c 'import pytest_timeout' 2>/dev/null && TEST_ARGS+=(--timeout 60)
stage tests 120 tests.log "$PYTHON" -m pytest "${TEST_ARGS[@]}" tests
{
    echo "== tests: counted from the log (complete even if the run was cut short)"
    for outcome in PASSED FAILED ERROR SKIPPED; do
        printf '   %-8s %s\n' "$outcome" "$(grep -c " $outcome" "$OUTDIR/tests.log")"
    done
    grep -E " (FAILED|ERROR) " "$OUTDIR/tests.log" | head -n 20 | sed 's/^/   /'
} | tee -a "$SUMMARY"

if ((!HAVE_CUDA)); then
    skip_stage memcheck memcheck.log "no CUDA device"
elif ! command -v compute-sanitizer >/dev/null; then
    skip_stage memcheck memcheck.log "compute-sanitizer is not on the PATH"
else
    for backend in cuda triton; do
        stage "mc-$backend" 45 memcheck.log compute-sanitizer --tool memcheck \
            --error-exitcode 1 "$PYTHON" -m bench.memcheck_case --backend "$backend"
    done
fi

if ((HAVE_CUDA)); then
    grid_limit=$((BUDGET_S - SECONDS - 5))
    stage grid "$grid_limit" bench.log "$PYTHON" -m bench --grid gpu --out "$OUTDIR/grid" \
        --time-budget $((grid_limit > 30 ? grid_limit - 15 : 15))
    bench_json "$OUTDIR/grid" grid
else
    skip_stage grid bench.log "no CUDA device"
fi

echo
for name in paper grid; do
    if [[ -f $OUTDIR/$name.json ]]; then
        "$PYTHON" -m bench.summary "$OUTDIR/$name.json" 2>&1 | tee -a "$SUMMARY"
    fi
done
{
    echo
    echo "stage     outcome                   time   (logs and results in $OUTDIR; total ${SECONDS} s)"
    printf '%s\n' "${STAGES[@]}"
} | tee -a "$SUMMARY"
