"""pytest-benchmark: the RL and preference ops, native ``cpu`` backend vs the ``torch`` reference.

    pytest bench/bench_rl_ops.py --benchmark-only [--benchmark-group-by=param:op]

Forward + backward at the quick sizes of :mod:`fastalign.bench.rl_ops` (the same inputs and step
functions), plus GAE at B=64, T=1024 against TRL's per-timestep loop. The full sizes and the
speedup table are ``python -m fastalign.bench.rl_ops``.
"""

from __future__ import annotations

import pytest
import torch

from fastalign import ops
from fastalign.bench.rl_ops import GAE_TARGET, _cases, _fwd_bwd, trl_gae

CASES = {op: factory for op, _, factory in _cases(quick=True)}

pytestmark = pytest.mark.skipif(not ops.backends()["cpu"].available, reason="fastalign._C is not built")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("op", sorted(CASES))
def test_rl_op_forward_backward(benchmark, op, backend):
    if op == "gae" and backend == "torch":
        pytest.skip("the torch GAE loops over time in Python: timed once by test_gae_vs_trl_loop instead")
    inputs, step = CASES[op]()
    benchmark(_fwd_bwd(step, inputs, backend))


@pytest.mark.parametrize("impl", ["fastalign_cpu", "trl_loop"])
def test_gae_vs_trl_loop(benchmark, impl):
    b, t = GAE_TARGET["batch"], GAE_TARGET["length"]
    rewards, values, mask = torch.randn(b, t), torch.randn(b, t), torch.ones(b, t)
    if impl == "trl_loop":
        adv, _ = benchmark(trl_gae, rewards, values, 1.0, 0.95)
    else:
        with ops.backend("cpu"):
            adv, _ = benchmark(ops.gae, rewards, values, mask, gamma=1.0, lam=0.95)
    assert torch.equal(adv, trl_gae(rewards, values, 1.0, 0.95)[0])
