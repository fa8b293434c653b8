"""pytest-benchmark: fused-linear losses (forward + backward) at small sizes, fastalign vs Liger vs naive.

    pytest bench/bench_losses.py --benchmark-only [--benchmark-group-by=param:case]

Small shapes so it runs in seconds on a laptop; the full sizes, peak memory and the targets are
``fastalign bench losses`` (one subprocess per implementation). Inputs and the step functions are
the ones of :mod:`fastalign.bench.losses`, so both benchmarks time the same code.
"""

from __future__ import annotations

import pytest
import torch

from fastalign.bench.losses import IMPLS, QUICK, _inputs, _step_fn

CASES = ["dpo_t512", "grpo_t1024"]


def _available(impl: str) -> bool:
    module = {"liger": "liger_kernel.chunked_loss", "naive": "trl.trainer.utils"}.get(impl)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", ["fastalign", "liger", "naive", "floor"])
def test_loss_forward_backward(benchmark, case, impl):
    spec = QUICK[case]
    if impl not in IMPLS[spec["kind"]]:
        pytest.skip(f"{impl} is not measured for {case}")
    if not _available(impl):
        pytest.skip(f"{impl} is not installed")
    hidden, weight, labels, extra = _inputs(spec, torch.device("cpu"))
    step = _step_fn(spec, impl, hidden, weight, labels, extra, liger_compiled=False)

    def run():
        hidden.grad = weight.grad = None
        step()

    benchmark.extra_info.update(case=case, impl=impl, **{k: spec[k] for k in ("rows", "t", "h", "v")})
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
