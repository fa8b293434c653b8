"""Bandwidth of the Triton policy_loss and kl_penalty kernels on a CUDA device.

Both ops are memory-bound: the floor is the time to move their bytes once. Each measurement
runs forward + backward at B=64, T=4096 (and, without ``--quick``, at B=256, T=8192, where launch
latency no longer dominates) and, in the same run, ``torch.Tensor.copy_`` of a buffer
whose read + write traffic equals the op's minimal traffic (inputs read by the forward, inputs
read again by the backward, the gradient written). ``bandwidth_fraction`` = copy time / op time.

Two modes: ``eager`` (what a training loop sees, Python and launch overhead included) and
``cuda_graph`` (the same step replayed from a CUDA graph: the kernels' own speed). The pure
PyTorch reference backend is timed eagerly beside them (``torch_ms``).

    fastalign bench rl_gpu [--quick] [--out bench/results]   (or python -m fastalign.bench.rl_gpu)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
from typing import Callable

import torch

SHAPES = ((64, 4096), (256, 8192))  # (B, T); the first is the target shape


def _time_ms(fn: Callable[[], object], iters: int, graph: bool) -> float:
    """Mean milliseconds per call of ``fn`` on the current stream (CUDA events)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up (Triton compiles here), on a side stream as capture requires
            fn()
    torch.cuda.current_stream().wait_stream(side)
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        call = g.replay
    else:
        call = fn
    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _policy_case(B: int, T: int, dtype: torch.dtype):
    from fastalign import ops

    logp = (-torch.rand(B, T, device="cuda") * 3).to(dtype).requires_grad_(True)
    old = (logp.detach().float() + 0.2 * torch.randn(B, T, device="cuda")).to(dtype)
    ref = (logp.detach().float() + 0.2 * torch.randn(B, T, device="cuda")).to(dtype)
    adv = torch.randn(B, device="cuda", dtype=dtype)
    mask = torch.rand(B, T, device="cuda") > 0.1
    one = torch.ones((), device="cuda")

    def step():
        loss, _ = ops.policy_loss(logp, old, adv, mask, ref_logp=ref, beta=0.04, kl_kind="k3", loss_type="dapo")
        return torch.autograd.grad(loss, logp, one)

    inputs = [logp, old, ref, adv, mask]
    read = sum(t.numel() * t.element_size() for t in inputs)
    traffic = 2 * read + logp.numel() * logp.element_size()  # fwd reads, bwd reads, grad written
    return step, traffic


def _kl_case(B: int, T: int, dtype: torch.dtype):
    from fastalign import ops

    logp = (-torch.rand(B, T, device="cuda") * 3).to(dtype).requires_grad_(True)
    ref = (logp.detach().float() + 0.2 * torch.randn(B, T, device="cuda")).to(dtype)
    upstream = torch.randn(B, T, device="cuda")

    def step():
        kl = ops.kl_penalty(logp, ref, kind="k3")
        return torch.autograd.grad(kl, logp, upstream)

    elem = logp.element_size()
    # fwd: read logp, ref, write fp32 kl; bwd: read upstream (fp32), logp, ref, write grad.
    traffic = B * T * (2 * elem + 4) + B * T * (4 + 2 * elem + elem)
    return step, traffic


def run(quick: bool = False) -> list[dict]:
    """One record per (op, dtype, mode); an empty list without a CUDA device."""
    if not torch.cuda.is_available():
        return []
    from fastalign import ops

    iters = 20 if quick else 200
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    device_name = torch.cuda.get_device_name()
    shapes = SHAPES[:1] if quick else SHAPES
    records = []
    cases = itertools.product(shapes, (("policy_loss", _policy_case), ("kl_penalty", _kl_case)), dtypes)
    for (B, T), (op, make), dtype in cases:
        step, traffic = make(B, T, dtype)
        src = torch.empty(traffic // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        with ops.backend("torch"):
            torch_ms = _time_ms(step, iters, graph=False)
        for mode in ("eager", "cuda_graph"):
            graph = mode == "cuda_graph"
            with ops.backend("triton"):
                op_ms = _time_ms(step, iters, graph)
            copy_ms = _time_ms(functools.partial(dst.copy_, src), iters, graph)
            records.append({
                "op": op, "dtype": str(dtype).replace("torch.", ""), "B": B, "T": T, "mode": mode,
                "device": device_name, "bytes": traffic,
                "triton_ms": op_ms, "copy_ms": copy_ms, "torch_ms": torch_ms,
                "triton_GBps": traffic / op_ms / 1e6, "copy_GBps": traffic / copy_ms / 1e6,
                "bandwidth_fraction": copy_ms / op_ms, "speedup_vs_torch": torch_ms / op_ms,
            })
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastalign bench rl_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B=64, T=4096, bf16 only, 20 iterations")
    parser.add_argument("--out", default=os.path.join("bench", "results"), help="directory for the JSON")
    args = parser.parse_args(argv)
    records = run(args.quick)
    if not records:
        print("no CUDA device: nothing measured")
        return 0
    print(f"{'op':<12} {'B x T':<11} {'dtype':<9} {'mode':<11} {'triton ms':>9} {'copy ms':>8} {'GB/s':>7} "
          f"{'of copy':>7} {'torch ms':>8}")
    for r in records:
        shape = f"{r['B']}x{r['T']}"
        print(f"{r['op']:<12} {shape:<11} {r['dtype']:<9} {r['mode']:<11} {r['triton_ms']:9.4f} "
              f"{r['copy_ms']:8.4f} {r['triton_GBps']:7.0f} {r['bandwidth_fraction']:7.0%} {r['torch_ms']:8.4f}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cuda-rl_gpu.json")
    with open(path, "w") as f:
        json.dump({"suite": "rl_gpu", "torch": torch.__version__, "triton_target_fraction": 0.7,
                   "quick": args.quick, "rows": records}, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
