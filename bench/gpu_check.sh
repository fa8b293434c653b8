#!/usr/bin/env bash
# The GPU check of the triton log-prob kernels, for one run on an H100/H200 (< 8 minutes):
#   1. build fastalign (extension included) with the machine's torch;
#   2. the GPU tests (tests/gpu/ and the triton module tests, compiled this time);
#   3. the issue's measurements at N=8192, H=4096, V=151936 bf16: bare-GEMM floor, triton
#      token_logprobs forward and forward+backward (exact and filtered), Liger's fused linear
#      cross-entropy when it is installed (carry its wheel in .whl/), peak memory of each;
#   4. `fastalign bench logprobs` and `fastalign bench losses` when the bench CLI exists.
# Everything lands in $OUT (default ./gpu_check_out): logs, gpu_logprobs.json, bench reports.
# Usage: bash bench/gpu_check.sh [--quick]   (--quick: smaller shapes, a smoke run)
set -u
OUT=${OUT:-$PWD/gpu_check_out}
export OUT
mkdir -p "$OUT"
PY=${PYTHON:-python3}
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
export PYTHONUNBUFFERED=1
status=0
step() { echo "=== $* ($(date +%T))" | tee -a "$OUT/summary.txt"; }
record() { echo "    rc=$1 $2" | tee -a "$OUT/summary.txt"; [ "$1" = 0 ] || status=1; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

if ls .whl/*.whl > /dev/null 2>&1; then  # e.g. liger-kernel, carried as wheels (see the device README)
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "build"
MAX_JOBS=${MAX_JOBS:-16} timeout 240 $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
rc=$?
if [ $rc != 0 ]; then  # the triton kernels need no extension: fall back to a pure-Python install
    record $rc "full build failed (tail of build.log below); installing without the extension"
    tail -20 "$OUT/build.log"
    FASTALIGN_NO_EXTENSION=1 timeout 120 $PY -m pip install -q --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1
    record $? "pure-Python install"
else
    record 0 "build"
fi

step "GPU tests"
timeout 200 $PY -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_logprobs.py tests/test_triton_logprobs.py \
    -x --durations=10 > "$OUT/pytest_gpu.log" 2>&1
record $? "pytest (log: pytest_gpu.log)"
tail -15 "$OUT/pytest_gpu.log"

step "measurements"
QUICK=$QUICK timeout 180 $PY - > "$OUT/measure.log" 2>&1 <<'EOF'
import json
import os
import statistics

import torch

from fastalign import ops

quick = os.environ.get("QUICK") == "1"
N, H, V = (2048, 2048, 32000) if quick else (8192, 4096, 151936)
dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)
hidden = torch.randn(N, H, device=dev, dtype=dt).requires_grad_()
weight = (torch.randn(V, H, device=dev) * 0.02).to(dt).requires_grad_()
labels = torch.randint(0, V, (N,), device=dev)
GiB = 2 ** 30
floor_bytes = 2 * (hidden.numel() + weight.numel()) * 2


def timed(fn, reps=5):
    fn()  # warm-up (autotuning, compilation)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / GiB


def clear():
    hidden.grad = weight.grad = None


def gemm_floor():  # one GEMM forward, two backward, nothing else: the floor of any fused kernel
    clear()
    dz = hidden @ weight.t()  # the logits stand in for d(logits): same shape, same GEMMs
    hidden.grad, weight.grad = dz @ weight, dz.t() @ hidden


def gemm_forward():
    with torch.no_grad():
        hidden @ weight.t()


def triton_fwd():
    with torch.no_grad(), ops.backend("triton"):
        ops.token_logprobs(hidden, weight, labels, return_entropy=True)


def triton_fwd_bwd(eps=0.0):
    def run():
        clear()
        with ops.backend("triton"):
            logp, ent = ops.token_logprobs(hidden, weight, labels, return_entropy=True, grad_filter_eps=eps)
        (logp.sum() * -1.0 / N).backward()
    return run


results = {"shape": {"N": N, "H": H, "V": V, "dtype": "bf16"}, "device": torch.cuda.get_device_name(),
           "floor_bytes_GiB": floor_bytes / GiB}
for name, fn in [("gemm_forward", gemm_forward), ("gemm_fwd_bwd_floor", gemm_floor), ("triton_forward", triton_fwd),
                 ("triton_fwd_bwd", triton_fwd_bwd()), ("triton_fwd_bwd_filtered_2^-12", triton_fwd_bwd(2.0 ** -12))]:
    try:
        ms, peak = timed(fn)
        results[name] = {"ms": ms, "peak_GiB": peak}
    except Exception as exc:  # report and go on: one failure should not hide the other numbers
        results[name] = {"error": repr(exc)[:300]}
    print(name, results[name], flush=True)
try:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def liger():
        clear()
        liger_fused_linear_cross_entropy(hidden, weight, labels).backward()
    ms, peak = timed(liger)
    results["liger_flce_fwd_bwd"] = {"ms": ms, "peak_GiB": peak}
except Exception as exc:
    results["liger_flce_fwd_bwd"] = {"error": repr(exc)[:300]}
print("liger_flce_fwd_bwd", results["liger_flce_fwd_bwd"])
r = results
if "ms" in r.get("triton_fwd_bwd", {}):
    t = r["triton_fwd_bwd"]
    r["ratios"] = {
        "fwd_bwd_over_gemm_floor (target <= 1.6)": t["ms"] / r["gemm_fwd_bwd_floor"]["ms"],
        "peak_over_inputs_plus_grads (target <= 1.2)": t["peak_GiB"] / r["floor_bytes_GiB"],
    }
    if "ms" in r.get("triton_forward", {}):
        r["ratios"]["forward_over_one_gemm (target <= 1.15)"] = r["triton_forward"]["ms"] / r["gemm_forward"]["ms"]
    if "ms" in r.get("liger_flce_fwd_bwd", {}):
        r["ratios"]["liger_over_triton (target >= 2.5)"] = r["liger_flce_fwd_bwd"]["ms"] / t["ms"]
print(json.dumps(r, indent=1))
with open(os.path.join(os.environ.get("OUT", "."), "gpu_logprobs.json"), "w") as f:
    json.dump(r, f, indent=1)
EOF
record $? "measurements (measure.log, gpu_logprobs.json)"
cat "$OUT/measure.log" | tail -30

for what in logprobs losses; do
    step "fastalign bench $what"
    if $PY -m fastalign.cli bench --help > /dev/null 2>&1; then
        args=(--out "$OUT")
        [ $QUICK = 1 ] && args+=(--quick)
        timeout 90 $PY -m fastalign.cli bench "$what" "${args[@]}" > "$OUT/bench_$what.log" 2>&1
        record $? "fastalign bench $what (bench_$what.log)"
        tail -15 "$OUT/bench_$what.log"
    else
        record 0 "skipped: this checkout has no 'fastalign bench' command yet"
    fi
done
exit $status
