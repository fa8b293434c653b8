"""rollout_is_weights, off_policy_mask, entropy_mask and reinforce_pp_advantages (issue 12), every backend,
against float64 written from the formulas in the tests (ANCHORS.md, "This year's objectives")."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from conftest import TRITON_DEVICE, one_and_two_processes, use_triton

from fastalign import ops
from fastalign.ops import dispatch

BACKENDS = ["torch", "cpu", "triton"]


def on_backend(name):
    if name == "triton":
        use_triton()
    elif not dispatch.backends()[name].available:
        pytest.skip(f"{name} backend unavailable")
    return dispatch.backend(name)


def device_of(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def logps(seed, b=5, t=11):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 2
    rollout = old + 0.3 * torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[2] = False
    return old, rollout, mask


def rollout64(old, rollout, mask, mode, low, high):
    lo = -math.inf if low is None else low
    hi = math.inf if high is None else high
    out = torch.empty(old.shape, dtype=torch.float64)
    d = (old.double() - rollout.double()) * mask.double()
    for i in range(old.shape[0]):
        for t in range(old.shape[1]):
            log_rho = d[i].sum() if mode.startswith("sequence") else d[i, t]
            rho = math.exp(float(log_rho))
            if mode.endswith("truncate"):
                out[i, t] = min(max(rho, lo), hi)
            else:
                out[i, t] = rho if lo <= rho <= hi else 0.0
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("low,high", [(None, 3.0), (0.8, 1.2), (0.9, None)])
def test_rollout_is_weights(backend, mode, low, high):
    if mode.endswith("truncate") and high is None:
        pytest.skip("truncation needs a cap (tested among the bad options)")
    old, rollout, mask = logps(7)
    dev = device_of(backend)
    with on_backend(backend):
        got = ops.rollout_is_weights(old.to(dev), rollout.to(dev), mask.to(dev), mode=mode, low=low, high=high)
    want = rollout64(old, rollout, mask, mode, low, high)
    assert got.dtype == torch.float32 and got.shape == old.shape and not got.requires_grad
    assert torch.allclose(got.double().cpu(), want, rtol=1e-5, atol=1e-6)
    if mode.endswith("mask") and low is not None:
        assert (got == 0).any()  # the bounds did drop something


def test_rollout_is_weights_nan_counts_as_ratio_one():
    old, rollout, mask = logps(1)
    rollout[0, 0] = float("nan")
    mask[0, 0] = True
    got = ops.rollout_is_weights(old, rollout, mask, mode="token_truncate", high=3.0)
    assert got[0, 0] == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_off_policy_mask(backend):
    old, sampling, mask = logps(3, b=8)
    adv = torch.tensor([1.0, -1.0, -0.5, 0.0, -2.0, 0.3, -0.1, -1.0])
    dev = device_of(backend)
    threshold = 0.02
    with on_backend(backend):
        got = ops.off_policy_mask(old.to(dev), sampling.to(dev), adv.to(dev), mask.to(dev), threshold=threshold)
    want = []
    for i in range(8):
        m = mask[i].double()
        mean = float(((sampling[i].double() - old[i].double()) * m).sum() / max(float(m.sum()), 1.0))
        want.append(1.0 if adv[i] >= 0 or mean <= threshold else 0.0)
    assert got.shape == (8, 1)
    assert got.squeeze(1).cpu().tolist() == want
    assert 0.0 in want and 1.0 in [w for w, a in zip(want, adv) if a < 0]  # both outcomes for A < 0


def test_entropy_mask_keeps_the_top_fraction():
    g = torch.Generator().manual_seed(0)
    entropy = torch.rand(4, 25, generator=g) * 3
    mask = torch.rand(4, 25, generator=g) > 0.2
    for quantile in (0.2, 0.5, 1.0):
        got = ops.entropy_mask(entropy, mask, quantile=quantile)
        valid = entropy[mask].double().sort().values
        # torch.quantile's linear interpolation, written out
        pos = (1 - quantile) * (valid.numel() - 1)
        lo, frac = int(math.floor(pos)), pos - math.floor(pos)
        threshold = valid[lo] + frac * (valid[min(lo + 1, valid.numel() - 1)] - valid[lo])
        want = (entropy.double() >= threshold) & mask
        assert torch.equal(got, want)
        assert not (got & ~mask).any()
        assert abs(got.sum().item() - quantile * mask.sum().item()) <= 1.0


ENTROPY_WORKER = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    from fastalign import ops
    from fastalign.engine.distributed import init_distributed, shutdown

    out, seed = sys.argv[1], int(sys.argv[2])
    state = init_distributed()
    g = torch.Generator().manual_seed(seed)
    entropy = torch.rand(6, 17, generator=g) * 2
    mask = torch.rand(6, 17, generator=g) > 0.3
    mask[:3, 10:] = False  # the ranks hold different numbers of valid tokens
    rows = slice(3 * state.rank, 3 * state.rank + 3) if state.distributed else slice(0, 6)
    keep = ops.entropy_mask(entropy[rows], mask[rows], quantile=0.3,
                            group=dist.group.WORLD if state.distributed else None)
    if state.distributed:
        parts = [torch.zeros_like(keep) for _ in range(state.world_size)]
        dist.all_gather(parts, keep)
        keep = torch.cat(parts)
    if state.is_main:
        torch.save(keep, out)
    shutdown(state)
''')


def test_entropy_mask_over_two_gloo_processes_equals_one_process(tmp_path):
    one, two = one_and_two_processes(ENTROPY_WORKER, tmp_path, 11)
    assert one.any() and torch.equal(one, two)


def reinforce64(rewards, mask, group_size=None, kl=None, kl_coef=0.0):
    r = rewards.double().tolist()
    if group_size:
        r = [x - sum(r[i - i % group_size:i - i % group_size + group_size]) / group_size for i, x in enumerate(r)]
    b, t = mask.shape
    ret = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        valid = [j for j in range(t) if mask[i, j]]
        running = 0.0
        for j in reversed(valid):
            step = -kl_coef * (float(kl[i, j]) if kl is not None else 0.0)
            if j == valid[-1]:
                step += r[i]
            running += step
            ret[i, j] = running
    vals = ret[mask]
    mean, var = vals.mean(), vals.var(unbiased=True)
    return torch.where(mask, (ret - mean) / torch.sqrt(var + 1e-8), torch.zeros(()).double())


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("group_size,kl_coef", [(None, 0.0), (None, 0.1), (4, 0.0), (4, 0.05)])
def test_reinforce_pp_advantages(backend, group_size, kl_coef):
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(8, generator=g)
    mask = torch.rand(8, 9, generator=g) > 0.2
    mask[3] = False
    kl = torch.rand(8, 9, generator=g) if kl_coef else None
    with on_backend(backend):
        got = ops.reinforce_pp_advantages(rewards, mask, group_size=group_size, kl=kl, kl_coef=kl_coef)
    want = reinforce64(rewards, mask, group_size, kl, kl_coef)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    assert (got[~mask] == 0).all()
    assert torch.allclose(ops.reference.reinforce_pp_advantages(rewards, mask, group_size=group_size, kl=kl,
                                                                kl_coef=kl_coef).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, name", [
    (lambda o, r, m: ops.rollout_is_weights(o, r, m, mode="token"), "mode"),
    (lambda o, r, m: ops.rollout_is_weights(o, r, m, mode="token_truncate", high=None), "high"),
    (lambda o, r, m: ops.rollout_is_weights(o, r, m, mode="token_mask", low=2.0, high=1.0), "low"),
    (lambda o, r, m: ops.rollout_is_weights(o, r[:, :3], m, mode="token_mask"), "rollout_logp"),
    (lambda o, r, m: ops.entropy_mask(o.abs(), m, quantile=0.0), "quantile"),
    (lambda o, r, m: ops.entropy_mask(o.abs(), m, quantile=1.2), "quantile"),
    (lambda o, r, m: ops.off_policy_mask(o, r, torch.zeros(o.shape[0]), m, threshold="x"), "threshold"),
    (lambda o, r, m: ops.off_policy_mask(o, r, torch.zeros(2), m, threshold=0.1), "advantages"),
    (lambda o, r, m: ops.reinforce_pp_advantages(torch.zeros(5), m, group_size=2), "group_size"),
    (lambda o, r, m: ops.reinforce_pp_advantages(torch.zeros(5), m, kl_coef=0.1), "kl"),
])
def test_bad_inputs_name_the_argument(call, name):
    old, rollout, mask = logps(0)
    with pytest.raises(ValueError, match=name):
        call(old, rollout, mask)
