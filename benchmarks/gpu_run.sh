#!/usr/bin/env bash
# The GPU benchmark run, in one call on a bare machine with no network:
#
#   benchmarks/gpu_run.sh OUTDIR
#
# 1. checks that torch sees a CUDA GPU (exits 2 at once, with a message, when it does not);
# 2. builds drep_kernels._C with ninja for this card's architecture only;
# 3. runs the fast GPU tests (pytest -m "gpu and not slow" tests/: every kernel, dtype and path
#    once against the torch backend, about a minute);
# 4. runs the GPU sweep (pytest benchmarks/ --drep-sizes=full) in three tiers, each with its
#    own JSON and time budget: uncompiled contenders, torch.compile, max-autotune;
# 5. writes OUTDIR/report.md and OUTDIR/speedup.png;
# 6. runs the slow GPU tests (-m "gpu and slow": 2^32 elements, torch.compile) with the time
#    that is left, and prints the summary table last.
#
# The whole run stays under DREP_GPU_BUDGET_S seconds (default 450; with the kill grace
# periods under 8 minutes): every step runs under `timeout` bounded by the time left, and the
# sweep skips the cases that would start after its budget.
# OUTDIR receives at most 7 files: run.log, tests-{fast,slow}.log, bench-{plain,compile,autotune}.json,
# report.md, speedup.png (run.log holds the rest). Exit status: 0 when everything ran; 1 when the build, the tests or a tier
# failed (the rest still runs); 2 when there is no GPU or no OUTDIR.
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: benchmarks/gpu_run.sh OUTDIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
BUDGET=${DREP_GPU_BUDGET_S:-450}
START=$SECONDS
LOG="$OUT/run.log"
: > "$LOG"
STATUS=0
NOTES=()

say() { echo "[gpu_run +$((SECONDS - START))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - (SECONDS - START))); }
note_failure() { STATUS=1; NOTES+=("$1"); say "FAILED: $1"; }

SIZES=${DREP_GPU_RUN_SIZES:-full}
DEVICE_ARGS=()
if [ "${DREP_GPU_RUN_PLUMBING:-0}" = 1 ]; then
    # Test of this script's plumbing on a machine without a GPU: CPU, no CUDA build, and
    # (unless DREP_GPU_RUN_SIZES says otherwise) the smoke shapes. Never for results.
    say "PLUMBING TEST: no GPU check, CPU build, --drep-device=cpu --drep-sizes=${DREP_GPU_RUN_SIZES:=smoke}"
    SIZES=$DREP_GPU_RUN_SIZES
    DEVICE_ARGS=(--drep-device=cpu)
    export FORCE_CUDA=0
    GPU="0 0 plumbing-test-cpu"
# 1. A GPU, or a clear failure now (no build, no tests, no waiting).
elif ! GPU=$(timeout -k 5 90 "$PY" - 2>&1 <<'PYEOF'
import sys
try:
    import torch
except ImportError as e:
    sys.exit(f"torch cannot be imported: {e}")
if not torch.cuda.is_available():
    sys.exit(f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
major, minor = torch.cuda.get_device_capability()
print(f"{major} {minor} {torch.cuda.get_device_name()}")
PYEOF
); then
    echo "gpu_run: FAILED: ${GPU:-the GPU check timed out}; nothing was built or benchmarked." | tee -a "$LOG" >&2
    exit 2
fi
GPU=$(tail -n 1 <<< "$GPU")  # the last line; warnings may precede it
read -r MAJOR MINOR NAME <<< "$GPU"
# Hopper's wgmma and setmaxnreg need the arch-specific target (9.0a); others build plain.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    case "$MAJOR.$MINOR" in
        9.0|10.0|10.3|12.0|12.1) TORCH_CUDA_ARCH_LIST="$MAJOR.${MINOR}a" ;;
        *) TORCH_CUDA_ARCH_LIST="$MAJOR.$MINOR" ;;
    esac
fi
export TORCH_CUDA_ARCH_LIST
# A _C built without the CUDA kernels then fails the GPU tests' registration check
# (tests/test_cuda_kernels.py test_cuda_kernels_registered) instead of skipping them all;
# a _C that does not load at all stops pytest with its diagnosis (tests/conftest.py).
[ "${DREP_GPU_RUN_PLUMBING:-0}" = 1 ] || export DREP_EXPECT_CUDA=1
say "GPU: $NAME (sm_$MAJOR$MINOR); building for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST; budget ${BUDGET}s"

# 2. Build the extension in place (ninja, all cores, this architecture only).
export MAX_JOBS=${MAX_JOBS:-$(nproc)} FORCE_CUDA=${FORCE_CUDA:-1}
if timeout -k 10 "$(( $(left) < 240 ? $(left) : 240 ))" \
        "$PY" setup.py build_ext --inplace >>"$LOG" 2>&1; then
    say "built drep_kernels._C"
else
    note_failure "build of drep_kernels._C (see run.log); benchmarking the backends that import"
fi
"$PY" -m drep_kernels.env 2>&1 | tee -a "$LOG"
"$PY" -c "import pytest_benchmark" 2>/dev/null || note_failure "pytest-benchmark cannot be imported: the sweep's tiers will fail"

# 3. The fast GPU tests: every kernel, dtype and path once, right after the build, so that a
#    broken kernel shows even if the sweep eats the rest of the time.
gpu_tests() {  # tier name, marker expression, seconds
    local name=$1 expr=$2 secs=$3
    if [ "$secs" -lt 20 ]; then
        note_failure "no time left for the $name GPU tests"
        return
    fi
    say "GPU tests ($name, -m \"$expr\"): up to ${secs}s"
    # -v: every test's outcome is logged as it ends, so a tier stopped at its time limit still
    # names its failures; a module that fails to import costs its own tests, not the tier's.
    timeout -k 10 "$secs" "$PY" -m pytest -m "$expr" tests/ -v -p no:cacheprovider -rfE --durations=15 \
        --continue-on-collection-errors >"$OUT/tests-$name.log" 2>&1
    local rc=$?
    tail -n 3 "$OUT/tests-$name.log" | tee -a "$LOG"
    case $rc in
        0) say "GPU tests ($name) passed" ;;
        5) say "no test selected for the $name tier" ;;
        124|137) note_failure "GPU tests ($name) ran past ${secs}s (see tests-$name.log)" ;;
        *) note_failure "GPU tests ($name): pytest exit $rc (see tests-$name.log)" ;;
    esac
}
gpu_tests fast "gpu and not slow" $(( $(left) - 240 < 120 ? $(left) - 240 : 120 ))

# 4. The sweep, in tiers; each tier's pytest skips the cases that would start after its
#    budget, and `timeout` stops it 60 s later (a case can be a long compile) as a last resort.
tier() {  # name, share of the time left (percent), -k expression
    local name=$1 share=$2 expr=$3
    local avail=$(( $(left) - 45 ))  # keep 45 s for the report
    local budget=$(( avail * share / 100 ))
    if [ "$budget" -lt 15 ]; then
        note_failure "tier $name: no time left"
        return
    fi
    say "tier $name: budget ${budget}s"
    timeout -k 10 $(( budget + 60 < avail ? budget + 60 : avail )) \
        "$PY" -m pytest benchmarks/ --benchmark-only --drep-sizes="$SIZES" "${DEVICE_ARGS[@]}" --drep-budget-s="$budget" \
        -k "$expr" -q -p no:cacheprovider --benchmark-json="$OUT/bench-$name.json" \
        --benchmark-columns=median,iqr,rounds >>"$LOG" 2>&1
    local rc=$?
    case $rc in
        0) say "tier $name done" ;;
        5) say "tier $name: no case selected here" ;;
        124|137) note_failure "tier $name killed at its time limit (its JSON is lost)" ;;
        *) note_failure "tier $name: pytest exit $rc (see run.log)" ;;
    esac
}
tier plain 70 "not compile"
tier compile 75 "compile and not max"
tier autotune 90 "max"

# 5. The report: markdown and PNG into OUTDIR, written before the slow tests so that they
#    cannot cost the sweep's results; the summary table is printed last (the whole report is
#    OUTDIR/report.md).
JSONS=$(ls "$OUT"/bench-*.json 2>/dev/null)
if [ -z "$JSONS" ]; then
    note_failure "no benchmark JSON was written"
    printf '%s\n' "${NOTES[@]}" >&2
    exit 1
fi
SUMMARY=$(mktemp)
# shellcheck disable=SC2086
timeout -k 5 45 "$PY" -m benchmarks.report $JSONS --out "$OUT" --print summary \
    --title "drep-kernels on $NAME" >"$SUMMARY" 2>>"$LOG" || note_failure "report (see run.log)"
cat "$SUMMARY" >>"$LOG"

# 6. The slow GPU tests with the time that is left (10 s kept for the kill grace).
gpu_tests slow "gpu and slow" $(( $(left) - 10 ))

say "finished in $((SECONDS - START))s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
for n in "${NOTES[@]}"; do echo "NOTE: $n"; done
cat "$SUMMARY"
rm -f "$SUMMARY"
exit $STATUS
