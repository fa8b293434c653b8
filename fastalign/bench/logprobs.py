"""Per-token log-probs from hidden states and an LM head, forward + backward, every way we know.

    fastalign bench logprobs [--quick] [--n N --h H --v V --dtype float32|bfloat16] [--out DIR]
    python -m fastalign.bench.logprobs ...

The op: ``logp = log_softmax(hidden @ weight.T)[label]`` for N tokens, then the backward of
``sum(logp * g)`` (a random ``g``, so no implementation can special-case a plain sum) into hidden
and weight. Default shape N=4096, H=1024, V=32000, float32 (``--quick``: N=512, H=256, V=8192).

Implementations (each one that cannot run here is listed with the reason):

* ``naive``     materialized logits, ``log_softmax``, ``gather``, autograd.
* ``trl``       materialized logits, TRL's ``selective_log_softmax`` (trl.trainer.utils), autograd.
* ``trl_chunked`` TRL's own fused LM head, ``trl.kernels.ChunkedLogProbFunction`` (TRL >= 1.16): cuBLAS
  tiles of 4096 tokens x 32768 vocabulary entries folded by Triton on CUDA, by torch ops elsewhere.
* ``floor``     the three GEMMs alone (logits, d_hidden, d_weight): what no exact method avoids.
* ``torch``     fastalign's token-chunked op, PyTorch row math (``backend("torch")``).
* ``cpu``       fastalign's token-chunked op, native fused OpenMP row kernels (CPU tensors).
* ``triton``    fastalign's Triton kernels (CUDA).
* ``liger``     Liger's fused-linear cross-entropy, ``reduction="none"`` (CUDA).
* ``cce``       Cut Cross-Entropy's ``linear_cross_entropy``, ``reduction="none"`` (CUDA, if installed).

Every implementation runs in its own subprocesses: one for the time (a warm-up call, then the
median of ``--iters`` calls; wall and process-CPU seconds), one for the peak memory growth of a
single call (see :mod:`fastalign.bench.common`). Ratios are against ``naive`` and ``floor`` of the
same run. Results: ``DIR/<device>-logprobs.json`` and ``.png`` (default DIR ``bench/results``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from fastalign.bench import common

IMPLS = ("naive", "trl", "trl_chunked", "floor", "torch", "cpu", "triton", "liger", "cce")
FULL = {"n": 4096, "h": 1024, "v": 32000}
QUICK = {"n": 512, "h": 256, "v": 8192}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (implementation, reference, metric, max ratio): the targets for the native CPU backend.
TARGETS = [("cpu", "naive", "seconds", 0.8), ("cpu", "floor", "seconds", 1.4), ("cpu", "naive", "peak_mb", 0.25)]


def _unavailable(impl: str, device: torch.device) -> str | None:
    """Why ``impl`` cannot run on ``device``, or None."""
    from fastalign import ops

    cuda_only = {"triton", "liger", "cce"}
    if impl in cuda_only and device.type != "cuda":
        return "needs a CUDA device"
    if impl == "cpu" and device.type != "cpu":
        return "CPU tensors only"
    if impl == "cpu" and not ops.backends()["cpu"].available:
        return ops.backends()["cpu"].reason
    if impl == "triton" and "triton" not in ops.dispatch.implementations("token_logprobs"):
        return "no triton backend registered for token_logprobs"
    modules = {"trl": "trl.trainer.utils", "trl_chunked": "trl.kernels", "liger": "liger_kernel.transformers",
               "cce": "cut_cross_entropy"}
    if impl in modules:
        try:
            module = __import__(modules[impl], fromlist=["_"])
        except ImportError as exc:
            return f"not installed ({exc})"
        if impl == "trl_chunked" and not hasattr(module, "ChunkedLogProbFunction"):
            return "this TRL has no trl.kernels.ChunkedLogProbFunction (TRL >= 1.16)"
    return None


def _inputs(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, h, generator=gen) * 0.5).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    g = torch.randn(n, generator=gen).to(device)
    return hidden, weight, labels, g


def _step(impl: str, hidden, weight, labels, g):
    """A closure running one forward + backward of ``impl``."""
    from fastalign import ops

    n = hidden.shape[0]
    if impl == "naive":
        def step():
            logits = (hidden @ weight.t()).float()
            logp = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
            (logp * g).sum().backward()
    elif impl == "trl":
        from trl.trainer.utils import selective_log_softmax
        # TRL calls it on [batch, seq, V] and loops over the batch: 512-token sequences.
        b = n // 512 if n % 512 == 0 and n >= 512 else 1

        def step():
            logits = (hidden @ weight.t()).float().view(b, n // b, -1)
            logp = selective_log_softmax(logits, labels.view(b, -1)).reshape(n)
            (logp * g).sum().backward()
    elif impl == "trl_chunked":
        from trl.kernels import ChunkedLogProbFunction
        try:  # the vocabulary chunk TRL's add_fused_lm_head passes (32768 in TRL 1.16); no optional outputs
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
        except ImportError:  # trl.trainer needs datasets/accelerate; the kernel itself does not
            chunk = 32768

        def step():
            logp = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, chunk, None, 1.0, ())[0]
            (logp * g).sum().backward()
    elif impl == "floor":
        h, w = hidden.detach(), weight.detach()

        def step():
            logits = h @ w.t()
            torch.mm(logits, w)      # d_hidden
            torch.mm(logits.t(), h)  # d_weight
    elif impl in ("torch", "cpu", "triton"):
        def step():
            with ops.backend(impl):
                logp = ops.token_logprobs(hidden, weight, labels)
            (logp * g).sum().backward()
    elif impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="none")

        def step():
            (-loss_fn(weight, hidden, labels) * g).sum().backward()
    elif impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def step():
            (-linear_cross_entropy(hidden, weight, labels, reduction="none") * g).sum().backward()
    else:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")

    def run():
        hidden.grad = weight.grad = None
        step()

    return run


def _worker(impl: str, mode: str, n: int, h: int, v: int, dtype: str, device: str, iters: int) -> dict:
    dev = torch.device(device)
    hidden, weight, labels, g = _inputs(n, h, v, DTYPES[dtype], dev)
    run = _step(impl, hidden, weight, labels, g)
    if mode == "memory":
        run()  # warm-up: one-time initialization is not the op's memory (glibc returns its blocks: MEMORY_ENV)
        hidden.grad = weight.grad = None  # freed inside the measured call otherwise, lowering its growth
        with common.PeakMemory(dev) as mem:
            run()
        return {"impl": impl, "peak_mb": mem.peak_mb}
    return {"impl": impl, **common.time_calls(run, iters, dev)}


def _measure(impl: str, args) -> dict:
    base = ["--n", str(args.n), "--h", str(args.h), "--v", str(args.v), "--dtype", args.dtype,
            "--device", args.device, "--iters", str(args.iters)]
    timing = common.run_worker(__name__, ["--worker", impl, "time", *base], memory=False, timeout=args.timeout)
    if "error" in timing:
        return {"impl": impl, "error": timing["error"]}
    memory = common.run_worker(__name__, ["--worker", impl, "memory", *base], memory=True, timeout=args.timeout)
    if "error" in memory:
        return {"impl": impl, "error": memory["error"]}
    return {**timing, **memory}


def _ratios(results: list[dict]) -> dict:
    by = {r["impl"]: r for r in results if "error" not in r and "skipped" not in r}
    for r in by.values():
        for ref in ("naive", "floor"):
            if ref in by and r is not by[ref]:
                r[f"time_vs_{ref}"] = r["seconds"] / by[ref]["seconds"]
                r[f"cpu_time_vs_{ref}"] = r["cpu_seconds"] / by[ref]["cpu_seconds"]
        if "naive" in by and by["naive"]["peak_mb"] > 0 and r is not by["naive"]:
            r["memory_vs_naive"] = r["peak_mb"] / by["naive"]["peak_mb"]
    targets = []
    for impl, ref, metric, limit in TARGETS:
        a, b = by.get(impl), by.get(ref)
        value = None if a is None or b is None else a[metric] / b[metric]
        targets.append({"ratio": f"{impl}/{ref} {metric}", "value": value, "target": limit,
                        "met": None if value is None else value <= limit})
    return {"targets": targets}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastalign bench logprobs", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"small sizes {QUICK} (seconds), for development")
    parser.add_argument("--n", type=int, default=None, help=f"tokens (default {FULL['n']})")
    parser.add_argument("--h", type=int, default=None, help=f"hidden size (default {FULL['h']})")
    parser.add_argument("--v", type=int, default=None, help=f"vocabulary (default {FULL['v']})")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--impls", nargs="*", default=None, help=f"subset of {', '.join(IMPLS)}")
    parser.add_argument("--iters", type=int, default=3, help="timed calls per implementation (median)")
    parser.add_argument("--out", default=os.path.join("bench", "results"), help="directory for the JSON and PNG")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measuring subprocess")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for key in ("n", "h", "v"):
        if getattr(args, key) is None:
            setattr(args, key, sizes[key])
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device, and torch sees none")
    if args.worker:
        import json
        print(json.dumps(_worker(*args.worker, args.n, args.h, args.v, args.dtype, args.device, args.iters)))
        return 0
    impls = args.impls or list(IMPLS)
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        parser.error(f"--impls must be among {', '.join(IMPLS)}, got {', '.join(unknown)}")

    device = torch.device(args.device)
    print(f"token log-probs fwd+bwd: N={args.n} H={args.h} V={args.v} {args.dtype} on {device.type}, "
          f"{torch.get_num_threads()} threads", flush=True)
    results = []
    for impl in impls:
        why = _unavailable(impl, device)
        r = {"impl": impl, "skipped": why} if why else _measure(impl, args)
        results.append(r)
        state = r.get("skipped") or r.get("error")
        print(f"  {impl:<7} " + (f"-- {state}" if state else f"{r['seconds']:.3f} s, {r['peak_mb']:.0f} MiB"),
              flush=True)
    summary = _ratios(results)
    ran = [r for r in results if "seconds" in r]
    print()
    common.print_table(ran, [("impl", "impl", "s"), ("seconds", "wall s", ".3f"), ("cpu_seconds", "cpu s", ".3f"),
                             ("peak_mb", "peak MiB", ".0f"), ("time_vs_naive", "t/naive", ".2f"),
                             ("time_vs_floor", "t/floor", ".2f"), ("cpu_time_vs_floor", "cpu t/floor", ".2f"),
                             ("memory_vs_naive", "mem/naive", ".3f")])
    print()
    for t in summary["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        verdict = "" if t["met"] is None else ("met" if t["met"] else "NOT met")
        print(f"  {t['ratio']:<24} {value:>7}  (target <= {t['target']})  {verdict}")

    stem = os.path.join(args.out, f"{device.type}-logprobs")
    report = {"suite": "logprobs", "shape": {"n": args.n, "h": args.h, "v": args.v}, "dtype": args.dtype,
              "quick": args.quick, "iters": args.iters, "machine": common.machine_info(device),
              "results": results, **summary}
    common.write_json(stem + ".json", report)
    png = common.bar_chart(stem + ".png", f"token log-probs fwd+bwd, N={args.n} H={args.h} V={args.v} "
                           f"{args.dtype} ({device.type})", [r["impl"] for r in ran],
                           [("seconds (wall, median)", [r["seconds"] for r in ran]),
                            ("peak memory growth (MiB)", [r["peak_mb"] for r in ran])])
    print(f"\nwrote {stem}.json" + (f" and {png}" if png else " (no PNG: matplotlib missing)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
