"""steer_logits at decode time: the native cpu kernel (and triton on CUDA) against the torch reference.

    fastalign bench steering [--quick] [--out DIR]
    python -m fastalign.bench.steering [--quick] [--out DIR]

One decode step of token-level steering at B=8 sequences, V=32000, K=1 negative branch: the
combination alone (top_p=1) and with the top-p mask (top_p=0.9, where the reference sorts every
row). Inputs are logits-like (N(0, 3²)), fp32 and bf16 (``--quick``: fp32, fewer calls). Each row
of the result is the median wall time (``ms``) and process-CPU time (``cpu_ms``, all threads) of
``iters`` calls after a warm-up; ``speedup`` is the torch backend's wall time over this backend's,
from the same run. Results: ``DIR/<device>-steering.json``
(default DIR ``bench/results``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import torch

B, V, K = 8, 32000, 1


def _median_seconds(fn, iters: int, device: torch.device) -> tuple[float, float]:
    """Median (wall, process-CPU) seconds per call; CPU time is what a busy shared machine distorts least."""
    def call():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    call()  # warm-up (Triton compiles here)
    wall, cpu = [], []
    for _ in range(iters):
        start, cpu_start = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return statistics.median(wall), statistics.median(cpu)


def run(quick: bool = False, device: str | None = None) -> list[dict]:
    """Time every available backend of steer_logits; one dict per (dtype, top_p, backend)."""
    from fastalign import ops

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    native = "cpu" if device.type == "cpu" else "triton"
    status = ops.backends()
    backends = ["torch"] + ([native] if status[native].available else [])
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    iters = 5 if quick else 30
    rows = []
    for dtype in dtypes:
        value = (torch.randn(B, V, device=device) * 3).to(dtype)
        base = (value.float() + torch.randn(B, V, device=device)).to(dtype)
        negatives = (torch.randn(K, B, V, device=device) * 3).to(dtype)
        for top_p in (1.0, 0.9):
            step = functools.partial(ops.steer_logits, value, base, negatives, alpha=2.0, betas=[1.0], top_p=top_p,
                                     temperature=0.7)
            times = {}
            for name in backends:
                with ops.backend(name):
                    times[name] = _median_seconds(step, iters, device)
            for name in backends:
                wall, cpu = times[name]
                rows.append({"op": "steer_logits", "backend": name, "device": device.type, "batch": B, "vocab": V,
                             "num_negatives": K, "dtype": str(dtype).replace("torch.", ""), "top_p": top_p,
                             "ms": wall * 1e3, "cpu_ms": cpu * 1e3, "speedup": times["torch"][0] / wall,
                             "threads": torch.get_num_threads(), "iters": iters})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastalign bench steering", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fp32 only, 5 timed calls per backend")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--out", default=os.path.join("bench", "results"), help="directory for the JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device, and torch sees none")
    rows = run(args.quick, args.device)
    print(f"{'dtype':9} {'top_p':>5} {'backend':8} {'ms':>9} {'cpu_ms':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['dtype']:9} {r['top_p']:5.2f} {r['backend']:8} {r['ms']:9.3f} {r['cpu_ms']:9.3f} "
              f"{r['speedup']:7.2f}x")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{rows[0]['device']}-steering.json")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with open(path, "w") as f:
        json.dump({"suite": "steering", "torch": torch.__version__, "cpus": os.cpu_count(),
                   "load_average_1m": load, "quick": args.quick, "rows": rows}, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
