#!/usr/bin/env bash
# One-shot check for a fresh GPU machine (torch and triton installed, no network):
# builds the extension, runs the GPU tests, compute-sanitizer's memcheck, the GPU benchmark
# grid (with the training step), and prints a short table last. Every stage has a time
# limit inside a total budget (default 340 s, under the 6 minutes the lease allows); a
# failing stage is recorded and the next one runs.
#
#   bash bench/gpu_check.sh OUTDIR             # on the GPU machine (run from anywhere)
#   bash bench/gpu_check.sh OUTDIR --dry-run   # on a CPU: same flow, build and memcheck
#                                              # skipped, tiny benchmark grid on the CPU
#
# OUTDIR gets eight files (the device tool returns at most eight): summary.txt, build.log,
# tests.log, memcheck.log, bench.log, results.json, results.md, results.png.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 340).
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
BUDGET_S=${GPU_CHECK_BUDGET_S:-340}
SUMMARY=$OUTDIR/summary.txt
export PYTHONUNBUFFERED=1
# The repository root on the path, for scripts run by file name (csrc/memcheck_case.py).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Build only for the card in this machine (sm_90 on an H100): half the compile time.
if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]] && arch=$("$PYTHON" -c \
        'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null); then
    export TORCH_CUDA_ARCH_LIST=$arch
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

STAGES=()
# stage NAME CAP_SECONDS LOG COMMAND...: runs COMMAND with its output in OUTDIR/LOG, for at
# most CAP_SECONDS and never past the total budget; records the outcome for the table.
stage() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$((BUDGET_S - SECONDS))
    local limit=$((cap < left ? cap : left))
    if ((limit < 5)); then
        STAGES+=("$(printf '%-9s %-22s %5s s' "$name" "skipped: no time left" 0)")
        echo "skipped: no time left in the budget" >"$OUTDIR/$log"
        return
    fi
    echo "== $name (limit ${limit} s): $*" | tee -a "$SUMMARY"
    local start=$SECONDS rc
    timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$OUTDIR/$log" 2>&1
    rc=$?
    local outcome="ok"
    if ((rc == 124 || rc == 137)); then
        outcome="TIMEOUT after ${limit} s"
    elif ((rc == 5)) && [[ $name == tests ]]; then
        outcome="FAILED: no tests ran"  # pytest's exit code 5
    elif ((rc != 0)); then
        outcome="FAILED (exit $rc)"
    fi
    STAGES+=("$(printf '%-9s %-22s %5s s' "$name" "$outcome" $((SECONDS - start)))")
    tail -n 3 "$OUTDIR/$log" | sed 's/^/   /' | tee -a "$SUMMARY"
}

skip_stage() {  # skip_stage NAME LOG REASON
    STAGES+=("$(printf '%-9s %-22s %5s s' "$1" "skipped" 0)")
    echo "skipped: $3" | tee "$OUTDIR/$2" >>"$SUMMARY"
}

{
    echo "gpu_check $(date -u +%FT%TZ) in $(pwd), dry run: $DRY_RUN"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
            --format=csv 2>&1
    else
        echo "nvidia-smi: not on the PATH"
    fi
    "$PYTHON" - <<'PY' 2>&1
import platform, torch
try:
    import triton; triton_version = triton.__version__
except ImportError:
    triton_version = None
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}),"
      f" triton {triton_version}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB,"
          f" L2 {p.L2_cache_size / 2**20:.0f} MiB, capability {p.major}.{p.minor}")
PY
    echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS"
} >"$SUMMARY"
cat "$SUMMARY"

if ((DRY_RUN)); then
    skip_stage build build.log "dry run (would run: $PYTHON setup.py build_ext --inplace)"
else
    stage build 150 build.log "$PYTHON" setup.py build_ext --inplace
fi

stage tests 100 tests.log "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests

if ((DRY_RUN)); then
    skip_stage memcheck memcheck.log "dry run"
elif [[ ! -f csrc/memcheck_case.py ]]; then
    skip_stage memcheck memcheck.log "csrc/memcheck_case.py does not exist"
elif ! command -v compute-sanitizer >/dev/null; then
    skip_stage memcheck memcheck.log "compute-sanitizer is not on the PATH"
else
    stage memcheck 60 memcheck.log compute-sanitizer --tool memcheck --error-exitcode 1 \
        "$PYTHON" csrc/memcheck_case.py
fi

# The benchmark stops starting measurements 20 s before its limit, then writes its outputs.
bench_limit=$((BUDGET_S - SECONDS - 10))
if ((DRY_RUN)); then
    bench_args=(--grid tiny --device cpu --no-train-step)
else
    bench_args=(--grid gpu)
fi
stage bench "$bench_limit" bench.log "$PYTHON" -m bench "${bench_args[@]}" --out "$OUTDIR" \
    --time-budget $((bench_limit > 40 ? bench_limit - 20 : 20))

echo
if [[ -f $OUTDIR/results.json ]]; then
    "$PYTHON" -m bench.summary "$OUTDIR/results.json" 2>&1 | tee -a "$SUMMARY"
fi
{
    echo
    echo "stage     outcome                 time   (logs and results in $OUTDIR; total ${SECONDS} s)"
    printf '%s\n' "${STAGES[@]}"
} | tee -a "$SUMMARY"
