#!/usr/bin/env bash
# One prepared GPU run for the device tool (an H100/H200), within 6 minutes of command time:
#   1. the machine and its versions (env.txt); the peers from the wheels carried in .whl/;
#   2. fastalign installed pure-Python (FASTALIGN_NO_EXTENSION=1: seconds, no compiler);
#   3. the measurements first (bench/gpu_measure.py, FASTALIGN_AUTOTUNE=0): each result lands in
#      gpu_check.json as soon as it exists, so a run cut short keeps what it measured;
#   4. the CUDA extension build, bounded; 5. the GPU tests with FASTALIGN_AUTOTUNE=0, bounded.
# Each step gets what is left of GPU_CHECK_BUDGET (default 345 s) minus what the later steps need.
# $OUT gets 7 files: summary.txt env.txt install.log gpu_check.json measure.log build.log pytest_gpu.log.
#
# On the GPU machine, from the repository root (the device tool's `run`, carry [".whl"]):
#     bash bench/gpu_check.sh
# Fill the git-ignored .whl/ here first (pure-Python wheels; the machine has no network):
#     pip download --no-deps -d .whl liger-kernel cut-cross-entropy trl
# (about 2 MB; Liger's sm_90 log-prob/entropy kernel also needs nvidia-cutlass-dsl, a large binary
# wheel: without it that entry is recorded as skipped.)
# Dry run on any CPU machine (CI runs it): the same steps at tiny shapes under TRITON_INTERPRET=1
# with the peers that run on CPU, writing the same JSON; no install, build or GPU tests:
#     OUT=dir bash bench/gpu_check.sh --dry-run
set -u
DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: [OUT=dir] bash bench/gpu_check.sh [--dry-run]  (got '$1')" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
export OUT
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-345}
export PYTHONUNBUFFERED=1
start=$(date +%s)
status=0
elapsed() { echo $(( $(date +%s) - start )); }
# cap WANT RESERVE: WANT seconds, or less so that RESERVE seconds stay for the later steps (>= 5).
cap() { local left=$(( BUDGET - $(elapsed) - $2 )); [ "$left" -lt "$1" ] && echo $(( left > 5 ? left : 5 )) || echo "$1"; }
step() { echo "=== $* (t=$(elapsed) s)" | tee -a "$OUT/summary.txt"; }
record() { echo "    rc=$1 $2" | tee -a "$OUT/summary.txt"; [ "$1" = 0 ] || status=1; }

step "machine"
{
    [ $DRY = 1 ] && echo "dry run: CPU, TRITON_INTERPRET=1" || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    $PY -c "import triton; print('triton', triton.__version__)"
    command -v nvcc > /dev/null && nvcc --version | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ $DRY = 0 ]; then
    step "peers and fastalign, pure Python"
    {
        if ls .whl/*.whl > /dev/null 2>&1; then  # liger-kernel, cut-cross-entropy, trl (see the header)
            $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
                && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        else
            echo "no .whl/*.whl: the peers are measured only if the machine has them"
        fi
        FASTALIGN_NO_EXTENSION=1 timeout "$(cap 90 240)" $PY -m pip install -q --no-index --no-deps \
            --no-build-isolation -e .
    } > "$OUT/install.log" 2>&1
    rc=$?
    record $rc "install (install.log)"
    if [ $rc != 0 ]; then  # the measurements need only the sources: import them from the tree
        ln -sfn ../triton_kernels fastalign/triton_kernels
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
else
    export TRITON_INTERPRET=1
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

step "measurements (gpu_check.json, measure.log)"
# No new entry starts in the last 160 s of the budget: the build (<= 70 s) and the tests need them.
deadline=$(( start + BUDGET - 160 ))
args=(--out "$OUT/gpu_check.json" --deadline "$deadline")
[ $DRY = 1 ] && args+=(--dry-run)
FASTALIGN_AUTOTUNE=0 timeout "$(cap 300 140)" $PY bench/gpu_measure.py "${args[@]}" > "$OUT/measure.log" 2>&1
record $? "measurements"
tail -25 "$OUT/measure.log"

if [ $DRY = 0 ]; then
    step "CUDA extension build (build.log)"
    MAX_JOBS=${MAX_JOBS:-16} FASTALIGN_BUILD_CUDA=1 timeout "$(cap 70 60)" $PY setup.py -q build_ext --inplace \
        > "$OUT/build.log" 2>&1
    record $? "build (the triton kernels need no extension: the tests run either way)"
    tail -5 "$OUT/build.log"

    step "GPU tests, FASTALIGN_AUTOTUNE=0 (pytest_gpu.log)"
    # Most telling first: realistic sizes, then the RL kernels, then the interpreter's cases compiled.
    FASTALIGN_AUTOTUNE=0 timeout "$(cap 200 5)" $PY -m pytest -q -p no:cacheprovider --durations=5 \
        tests/gpu/test_gpu_logprobs.py tests/gpu/test_gpu_rl.py tests/test_triton_logprobs.py > "$OUT/pytest_gpu.log" 2>&1
    record $? "pytest"
    tail -15 "$OUT/pytest_gpu.log"
else
    step "build and GPU tests: skipped in a dry run (CI builds and runs the CPU tests itself)"
fi

step "done: ratios and targets"
$PY - "$OUT/gpu_check.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
d = json.load(open(sys.argv[1]))
if d["meta"].get("dry_run"):
    print("  (dry run: interpreter timings at tiny shapes; the ratios only prove the script works)")
for k, v in d["ratios"].items():
    print(f"  {k:<40} {v if isinstance(v, str) else format(v, '.3f')}")
for k, v in d["targets"].items():
    print(f"  target {k:<40} {'met' if v else 'NOT met'}")
failed = [k for k, v in d["results"].items() if "error" in v]
skipped = [k for k, v in d["results"].items() if "skipped" in v]
print("  entries with errors:", ", ".join(failed) or "none", "| skipped:", ", ".join(skipped) or "none")
EOF
[ "${PIPESTATUS[0]}" = 0 ] || status=1
files=$(find "$OUT" -type f | wc -l)
[ "$files" -le 8 ] || { echo "more than 8 files under $OUT ($files): only 8 come back" | tee -a "$OUT/summary.txt"; status=1; }
echo "=== finished in $(elapsed) s, status $status" | tee -a "$OUT/summary.txt"
exit $status
