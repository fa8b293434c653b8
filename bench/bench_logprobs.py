"""pytest-benchmark of token log-probs fwd+bwd at small sizes (run explicitly; not part of tests/).

    pytest bench/bench_logprobs.py --benchmark-only [--benchmark-json out.json]

The full-size comparison with peak memory is ``fastalign bench logprobs``; this file gives
statistically summarized timings of the same implementations for quick A/B checks of a change.
"""

from __future__ import annotations

import pytest
import torch

from fastalign import ops

N, H, V = 1024, 256, 8192


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = (torch.randn(N, H, generator=gen) * 0.5).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::7] = -100
    return hidden, weight, labels, torch.randn(N, generator=gen)


def _naive(hidden, weight, labels, g):
    logits = hidden @ weight.t()
    valid = labels != -100
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    (torch.where(valid, logp, 0.0) * g).sum().backward()


def _floor(hidden, weight, labels, g):
    h, w = hidden.detach(), weight.detach()
    z = h @ w.t()
    torch.mm(z, w)
    torch.mm(z.t(), h)


def _fused(backend, budget=None):
    def step(hidden, weight, labels, g):
        with ops.backend(backend):
            logp = ops.token_logprobs(hidden, weight, labels, mem_budget=budget)
        (logp * g).sum().backward()
    return step


CASES = {
    "naive": _naive,
    "floor": _floor,
    "torch": _fused("torch"),
    "cpu": _fused("cpu"),
    "cpu_recompute": _fused("cpu", budget=2**23),  # 8 MiB: 4 chunks, 3 of them recomputed
}


@pytest.mark.parametrize("impl", list(CASES))
def test_token_logprobs_fwd_bwd(benchmark, inputs, impl):
    if impl.startswith("cpu") and not ops.backends()["cpu"].available:
        pytest.skip(ops.backends()["cpu"].reason)
    hidden, weight, labels, g = inputs

    def run():
        hidden.grad = weight.grad = None
        CASES[impl](hidden, weight, labels, g)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
