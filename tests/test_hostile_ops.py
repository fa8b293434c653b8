"""Hostile values into the ops: out-of-range labels, masks that are not 0/1, NaN/Inf, empty masks.

The contract (README "Runs, resume and bad input"; fastalign/ops/validation.py):

* ``FASTALIGN_CHECK_VALUES=1`` (default): an out-of-range label or a mask value other than 0/1 raises.
* ``FASTALIGN_CHECK_VALUES=0``: no value checks, and still never an out-of-bounds read: a label outside
  ``[0, V)`` that is not ``ignore_index`` gives NaN log-prob for its position, no gradient from it, and
  every other position is unchanged — on every backend (torch, cpu, triton).
* NaN/Inf inputs come out as NaN (never a finite number); ``FASTALIGN_CHECK_VALUES=2`` refuses them.
* An all-zero mask: the losses (``policy_loss``, ``value_loss``) are 0 with zero gradient (a process whose
  micro-batch has no completion token still takes part in a step); ``whiten`` raises (no statistics).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TRITON_DEVICE, assert_rel, use_triton

from fastalign import ops

V, H, N = 37, 16, 7
BAD_LABELS = [2**40, -7, V]  # far out, negative (not ignore_index), one past the end
CPU_BACKENDS = ["torch", "cpu"]


@pytest.fixture
def no_value_checks(monkeypatch):
    monkeypatch.setenv("FASTALIGN_CHECK_VALUES", "0")


def _inputs(bad, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(device)
    weight = (0.5 * torch.randn(V, H, generator=g)).to(device)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2], labels[5] = bad, -100  # one hostile label, one ignored position
    return hidden, weight, labels.to(device)


def _reference(hidden, weight, labels):
    """float64 log-probs of the rows with in-range labels (0 where ignored or out of range)."""
    logp_all = torch.log_softmax(hidden.double().cpu() @ weight.double().cpu().t(), -1)
    labels = labels.cpu()
    ok = (labels >= 0) & (labels < V)
    return torch.where(ok, logp_all.gather(-1, labels.clamp(0, V - 1)[:, None]).squeeze(-1), 0.0)


def _check_out_of_range(backend, bad, device="cpu"):
    hidden, weight, labels = _inputs(bad, device)
    hidden.requires_grad_()
    weight.requires_grad_()
    with ops.backend(backend):
        logp = ops.token_logprobs(hidden, weight, labels)
        assert torch.isnan(logp[2]), f"{backend}: label {bad} gave {logp[2].item()}, not NaN"
        good = torch.ones(N, dtype=torch.bool)
        good[2] = False
        assert_rel(logp[good.to(device)], _reference(hidden, weight, labels)[good], 1e-5, f"{backend} other rows")
        # The hostile row passes no gradient: the gradients equal those with that position ignored.
        logp[good.to(device)].sum().backward()
        ignored = labels.clone()
        ignored[2] = -100
        h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        ops.token_logprobs(h2, w2, ignored).sum().backward()
        assert torch.equal(hidden.grad[2], torch.zeros_like(hidden.grad[2]))
        assert_rel(hidden.grad, h2.grad, 1e-5, f"{backend} d(hidden)")
        assert_rel(weight.grad, w2.grad, 1e-5, f"{backend} d(weight)")
        # From materialized logits too.
        logits = (hidden.detach() @ weight.detach().t()).requires_grad_()
        lp = ops.logprobs_from_logits(logits, labels)
        assert torch.isnan(lp[2]) and torch.isfinite(lp[good.to(device)]).all()
        lp[good.to(device)].sum().backward()
        assert torch.equal(logits.grad[2], torch.zeros_like(logits.grad[2]))


@pytest.mark.parametrize("bad", BAD_LABELS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_of_range_label_is_nan_never_a_read_out_of_bounds(no_value_checks, backend, bad):
    _check_out_of_range(backend, bad)


@pytest.mark.parametrize("bad", BAD_LABELS)
def test_out_of_range_label_in_the_triton_kernel(no_value_checks, bad):
    """The Triton kernel (in the interpreter without CUDA) keeps the same contract: NaN, no gradient, no crash."""
    use_triton()
    _check_out_of_range("triton", bad, TRITON_DEVICE)


def test_native_kernel_survives_a_huge_label_in_a_fresh_process():
    """The reported crash: ``2**40`` with value checks off segfaulted the cpu backend. A crash here would
    take the test process down, so it runs in a child."""
    code = textwrap.dedent("""
        import torch
        from fastalign import ops
        h, w = torch.randn(4, 8), torch.randn(11, 8)
        with ops.backend("cpu"):
            lp = ops.token_logprobs(h, w, torch.tensor([1, 2**40, -2**40, 3]))
        assert torch.isnan(lp[1:3]).all() and torch.isfinite(lp[[0, 3]]).all(), lp
        print("ok")
    """)
    import os

    env = dict(os.environ, FASTALIGN_CHECK_VALUES="0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_of_range_label_raises_by_default(backend):
    hidden, weight, labels = _inputs(2**40)
    with ops.backend(backend), pytest.raises(ValueError, match=r"labels must be in \[0, 37\) .* got 1099511627776"):
        ops.token_logprobs(hidden, weight, labels)


# -------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("value", [2.0, 0.5, float("nan"), -1.0])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_mask_must_hold_only_zeros_and_ones(backend, value):
    logp = torch.randn(2, 4)
    mask = torch.ones(2, 4)
    mask[1, 2] = value
    with ops.backend(backend):
        with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 .* at index \(1, 2\)"):
            ops.sequence_logprobs(logp, mask)
        with pytest.raises(ValueError, match=r"mask must hold only 0 and 1"):
            ops.policy_loss(logp, logp, torch.randn(2), mask)
        for ok in (mask.isnan() | (mask != 1)).logical_not(), torch.ones(2, 4, dtype=torch.int64), torch.ones(2, 4):
            assert torch.allclose(ops.sequence_logprobs(logp, ok), (logp * ok).sum(-1))


# ------------------------------------------------------------------------------------------ NaN / Inf
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_and_inf_inputs_come_out_nan_by_default_and_raise_at_level_2(backend, monkeypatch):
    hidden, weight, labels = _inputs(3)
    labels[5] = 4
    hidden[1, 3], hidden[4, 0] = float("nan"), float("inf")
    with ops.backend(backend):
        logp = ops.token_logprobs(hidden, weight, labels)
        assert torch.isnan(logp[[1, 4]]).all(), logp
        rest = [0, 2, 3, 5, 6]
        assert_rel(logp[rest], _reference(hidden, weight, labels)[rest], 1e-5, "finite rows")
        rewards = torch.tensor([1.0, float("nan"), 0.0, 1.0])
        assert torch.isnan(ops.group_advantages(rewards, 2)[:2]).all()
        monkeypatch.setenv("FASTALIGN_CHECK_VALUES", "2")
        with pytest.raises(ValueError, match=r"hidden must be finite \(FASTALIGN_CHECK_VALUES=2\), got nan at index "
                                             r"\(1, 3\) \(2 non-finite"):
            ops.token_logprobs(hidden, weight, labels)
        with pytest.raises(ValueError, match=r"rewards must be finite"):
            ops.group_advantages(rewards, 2)
        monkeypatch.setenv("FASTALIGN_CHECK_VALUES", "yes")
        with pytest.raises(ValueError, match=r"FASTALIGN_CHECK_VALUES must be 0 .* 1 .* or 2 .*, got 'yes'"):
            ops.token_logprobs(hidden, weight, labels)


# ------------------------------------------------------------------------------------- empty masks
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_all_zero_mask_is_a_zero_loss_but_whiten_raises(backend, loss_type):
    logp = torch.randn(2, 3, requires_grad=True)
    empty = torch.zeros(2, 3)
    with ops.backend(backend):
        loss, _ = ops.policy_loss(logp, logp.detach() + 0.1, torch.randn(2), empty, loss_type=loss_type,
                                  max_completion_length=3)
        values = torch.randn(2, 3, requires_grad=True)
        vloss, _ = ops.value_loss(values, values.detach(), torch.randn(2, 3), empty)
        (loss + vloss).backward()
        assert loss.item() == 0.0 and vloss.item() == 0.0
        assert torch.equal(logp.grad, torch.zeros(2, 3)) and torch.equal(values.grad, torch.zeros(2, 3))
        with pytest.raises(ValueError, match="mask must select at least one position"):
            ops.whiten(torch.randn(2, 3), empty)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int32, torch.float16])
def test_the_mask_check_finds_the_first_bad_value_natively_and_in_torch(dtype):
    """The native one-read check (CPU, contiguous) and the torch one report the same first index, across
    block boundaries (the native scan works in blocks of 1024), for NaN and -0.0 alike."""
    from fastalign.ops import validation

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        x = (torch.rand(3, 1500, generator=g) > 0.5).to(dtype)
        if dtype.is_floating_point:
            x[0, int(torch.randint(0, 1500, (1,), generator=g))] = -0.0  # still a valid 0
        bad = sorted(torch.randint(0, x.numel(), (trial % 3,), generator=g).tolist())
        for i in bad:
            x.view(-1)[i] = float("nan") if dtype.is_floating_point and i % 2 else 3
        want = None if not bad else tuple(int(k) for k in torch.unravel_index(torch.tensor(bad[0]), x.shape))
        assert validation._first_non_binary(x) == want
        assert validation._first_non_binary(x.t()) == (None if want is None else validation._first_index(
            (x.t() != 0) & (x.t() != 1)))  # non-contiguous: the torch path
