#!/usr/bin/env bash
# One-shot check for a fresh GPU machine (torch, triton and nvcc installed, no network, nothing
# built), at most 540 s in all, the most telling stage first, so that whatever cuts it short,
# what ran is kept. The stages, their caps and the Triton kernels each launches are the
# plan of bench/gpu_plan.py (`python -m bench.gpu_plan` prints it):
#   info      nvidia-smi and `python -m ecloss_fast` (versions, backends, the extension's torch)
#   prepare   the extension's build (required; MAX_JOBS = cores, one translation unit per CUDA
#             precision) beside `python -m bench.precompile`: every Triton kernel the later
#             stages launch, one process per core, into Triton's cache (the paper shape first)
#   smoke     every fused kernel and auto at the paper shape, then a ragged one, against the
#             torch backend, and the registers/spills/shared memory the JIT gave them
#   paper     the paper-setting benchmark (bf16, tf32, ieee; both estimators; the reference,
#             SDPA and the compiled reference beside the fused backends)
#   tests     pytest -m gpu, one worker per core, a per-test timeout; -v, so that every result
#             is in the log as it happens and a cut-short run still counts what passed
#   grid      the GPU grid (28x28 and float16 early), without the compiled reference
#   kernels   tests/test_triton_compile.py on this machine's triton: the kernel report
#   memcheck  compute-sanitizer on one cuda and one triton case
# A stage may use its cap and whatever the stages before it left unused, never the time
# of the stages after it.
#
#   bash bench/gpu_check.sh OUTDIR             # on the GPU machine (run from anywhere)
#   bash bench/gpu_check.sh OUTDIR --dry-run   # anywhere: print the plan (stages, caps,
#                                              # predicted times, Triton compiles) and stop
#
# OUTDIR gets at most eight files, each written as its stage goes: summary.txt, prepare.log,
# smoke.log, tests.log (tests, kernels, memcheck), bench.log (paper, grid), paper.json,
# grid.json, kernels.json (render a results json with `python -m bench.summary FILE`).
# Environment: PYTHON (default python3).
set -u -o pipefail

if [[ $# -lt 1 || $# -gt 2 || ( $# -eq 2 && $2 != --dry-run ) ]]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR [--dry-run]" >&2
    exit 2
fi
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
SUMMARY=$OUTDIR/summary.txt
export PYTHONUNBUFFERED=1
# The repository root on the path, for scripts run by file name.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [[ ${2:-} == --dry-run ]]; then
    "$PYTHON" -m bench.gpu_plan | tee "$SUMMARY"
    exit "${PIPESTATUS[0]}"
fi

declare -A CAP
ORDER=()
while read -r name cap; do
    CAP[$name]=$cap
    ORDER+=("$name")
done < <("$PYTHON" -m bench.gpu_plan --caps)
if ((${#ORDER[@]} == 0)); then
    echo "gpu_check: python -m bench.gpu_plan --caps printed no plan" >&2
    exit 1
fi

export ECLOSS_FAST_REQUIRE_EXTENSION=1
# Build only for the card in this machine (sm_90 on an H100/H200): half the compile time.
if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]] && arch=$("$PYTHON" -c \
        'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null); then
    export TORCH_CUDA_ARCH_LIST=$arch
fi
CORES=$(nproc)
export MAX_JOBS=${MAX_JOBS:-$CORES}
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

STAGES=()
# deadline NAME: seconds since the start by which stage NAME must end: the sum of the caps
# up to and including it, so unused time passes on to the next stage.
deadline() {
    local total=0 name
    for name in "${ORDER[@]}"; do
        total=$((total + CAP[$name]))
        [[ $name == "$1" ]] && break
    done
    echo "$total"
}

record() {  # record NAME OUTCOME SECONDS: the stage table's line, in summary.txt at once
    local line
    line=$(printf '%-9s %-26s %5s s' "$1" "$2" "$3")
    STAGES+=("$line")
    echo "== done: $line" >>"$SUMMARY"
}

# stage NAME LOG COMMAND...: runs COMMAND, its output appended to OUTDIR/LOG, until the stage's
# deadline; records the outcome. LIMIT is exported to the command: its seconds.
stage() {
    local name=$1 log=$2
    shift 2
    local limit=$(($(deadline "$name") - SECONDS))
    if ((limit < 5)); then
        record "$name" "skipped: no time left" 0
        return
    fi
    echo "== $name (limit ${limit} s): $*" >>"$OUTDIR/$log"
    [[ $log == summary.txt ]] || echo "== $name (limit ${limit} s): $*" >>"$SUMMARY"
    local start=$SECONDS rc outcome=ok
    LIMIT=$limit timeout --signal=TERM --kill-after=5 "$limit" "$@" >>"$OUTDIR/$log" 2>&1
    rc=$?
    if ((rc == 124 || rc == 137)); then
        outcome="TIMEOUT after ${limit} s"
    elif ((rc == 5)) && [[ $name == tests ]]; then
        outcome="FAILED: no tests ran"  # pytest's exit code 5
    elif ((rc != 0)); then
        outcome="FAILED (exit $rc)"
    fi
    record "$name" "$outcome" $((SECONDS - start))
    [[ $log == summary.txt ]] || tail -n 4 "$OUTDIR/$log" | sed 's/^/   /' | tee -a "$SUMMARY"
}

summarize() {  # summarize NAME: the table of OUTDIR/NAME.json into summary.txt, if it exists
    if [[ -f $OUTDIR/$1.json ]]; then
        "$PYTHON" -m bench.summary "$OUTDIR/$1.json" 2>&1 | tee -a "$SUMMARY"
    fi
}

skip_stage() {  # skip_stage NAME LOG REASON
    record "$1" "skipped" 0
    echo "== $1: skipped: $3" | tee -a "$OUTDIR/$2" >>"$SUMMARY"
}

# prepare: the build and the Triton precompile side by side (neither needs the other); the
# build decides the outcome, a failed compile is reported by the precompile's own lines.
prepare() {
    "$PYTHON" setup.py build_ext --inplace > >(sed -u 's/^/build: /') 2>&1 &
    local build=$!
    "$PYTHON" -m bench.precompile --jobs "$CORES" 2>&1 | sed -u 's/^/precompile: /'
    wait "$build"  # the build's exit status ($! of a pipeline would be sed's)
}

{
    echo "gpu_check $(date -u +%FT%TZ) in $(pwd), budget $(deadline memcheck) s"
    git log -1 --format='commit %H %s' 2>/dev/null
    "$PYTHON" -m bench.gpu_plan --caps | tr '\n' ' '
    echo
} >"$SUMMARY"
cat "$SUMMARY"

info() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
            --format=csv
    else
        echo "nvidia-smi: not on the PATH"
    fi
    "$PYTHON" -m ecloss_fast
    echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS cores=$CORES"
}
export -f info prepare
export PYTHON CORES MAX_JOBS
stage info summary.txt bash -c info
stage prepare prepare.log bash -c prepare

HAVE_CUDA=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if ((HAVE_CUDA)); then
    stage smoke smoke.log bash -c '"$PYTHON" -m bench.gpu_smoke --time-budget $((LIMIT - 5))'
    stage paper bench.log bash -c '"$PYTHON" -m bench --grid paper --out "$0/paper" \
        --json "$1/paper.json" --no-train-step --time-budget $((LIMIT - 15))' "$SCRATCH" "$OUTDIR"
    summarize paper
else
    skip_stage smoke smoke.log "no CUDA device"
    skip_stage paper bench.log "no CUDA device"
fi

TEST_ARGS=(-m gpu -v -p no:cacheprovider)
"$PYTHON" -c 'import xdist' 2>/dev/null && TEST_ARGS+=(-n "$CORES")
"$PYTHON" -c 'import pytest_timeout' 2>/dev/null && TEST_ARGS+=(--timeout 60)
stage tests tests.log "$PYTHON" -m pytest "${TEST_ARGS[@]}" tests
{
    echo "== tests: counted from the log (complete even if the run was cut short)"
    for outcome in PASSED FAILED ERROR SKIPPED; do
        printf '   %-8s %s\n' "$outcome" "$(grep -c " $outcome" "$OUTDIR/tests.log")"
    done
    grep -E " (FAILED|ERROR) " "$OUTDIR/tests.log" | head -n 20 | sed 's/^/   /'
} | tee -a "$SUMMARY"

if ((HAVE_CUDA)); then
    stage grid bench.log bash -c '"$PYTHON" -m bench --grid gpu --out "$0/grid" \
        --json "$1/grid.json" --backends reference torch triton cuda sdpa sdpa-flash auto \
        --time-budget $((LIMIT > 40 ? LIMIT - 25 : 15))' "$SCRATCH" "$OUTDIR"
    summarize grid
else
    skip_stage grid bench.log "no CUDA device"
fi

stage kernels tests.log env ECLOSS_KERNEL_REPORT="$OUTDIR/kernels.json" \
    "$PYTHON" -m pytest -v -p no:cacheprovider tests/test_triton_compile.py

if ((!HAVE_CUDA)); then
    skip_stage memcheck tests.log "no CUDA device"
elif ! command -v compute-sanitizer >/dev/null; then
    skip_stage memcheck tests.log "compute-sanitizer is not on the PATH"
else
    memcheck() {  # cuda in half the limit, triton in what is left; both run
        local backend limit failed=0 start=$SECONDS
        for backend in cuda triton; do
            limit=$((LIMIT / 2))
            [[ $backend == triton ]] && limit=$((LIMIT - (SECONDS - start) - 2))
            echo "== memcheck $backend (limit $limit s)"
            timeout --kill-after=5 "$limit" compute-sanitizer --tool memcheck \
                --error-exitcode 1 "$PYTHON" -m bench.memcheck_case --backend "$backend" \
                || failed=1
        done
        return $failed
    }
    export -f memcheck
    stage memcheck tests.log bash -c memcheck
fi

{
    echo
    echo "stage     outcome                     time   (logs and results in $OUTDIR; total ${SECONDS} s)"
    printf '%s\n' "${STAGES[@]}"
} | tee -a "$SUMMARY"
