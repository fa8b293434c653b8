"""D²O, KTO, ORPO and CPO ops on every backend against float64 formulas written out here.

The float64 truths below are the published formulas (ANCHORS.md, "Preference variants"), not the
spec module: each backend (torch spec, cpu C++, triton under the interpreter) must match them in
value and gradient, for fp32 and bf16 inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOL, assert_rel, use_triton

from fastalign import ops
from fastalign.ops import dispatch

BACKENDS = ("torch", "cpu", "triton")
DTYPES = (torch.float32, torch.bfloat16)


def backend_or_skip(name):
    if name == "triton":
        use_triton()
    status = dispatch.backends()[name]
    if not status.available:
        pytest.skip(f"{name} backend unavailable: {status.reason}")
    return ops.backend(name)


def logsig64(x):
    return torch.nn.functional.logsigmoid(x)


# ------------------------------------------------------------------------------------ float64 truth
def d2o64(ps, rs, pn, rn, beta, alpha):
    k = ps.shape[1]
    z = (beta / k) * (ps - rs).sum(1) - alpha * (pn - rn)
    return -logsig64(z)


def kto64(p, r, desirable, z0, beta, wd, wu):
    x = p - r
    out = []
    for i in range(p.shape[0]):
        if desirable[i]:
            out.append(wd * (1 - torch.sigmoid(beta * (x[i] - z0))))
        else:
            out.append(wu * (1 - torch.sigmoid(beta * (z0 - x[i]))))
    return torch.stack(out)


def orpo64(w, l_, beta):
    log_odds = (w - l_) - (torch.log1p(-torch.exp(w)) - torch.log1p(-torch.exp(l_)))
    return -beta * logsig64(log_odds)


def cpo64(c, r, beta, eps):
    x = beta * (c - r)
    return -(1 - eps) * logsig64(x) - eps * logsig64(-x)


def run(fn, inputs, grad_idx, weights, **kw):
    """Value and weighted-sum gradients of ``fn(*inputs)[0]`` for the inputs at ``grad_idx``."""
    leaves = [x.detach().clone().requires_grad_(i in grad_idx) if x.is_floating_point() else x
              for i, x in enumerate(inputs)]
    losses = fn(*leaves, **kw)
    losses = losses[0] if isinstance(losses, tuple) else losses
    (losses.double() * weights).sum().backward()
    return losses, [leaves[i].grad for i in grad_idx]


def check(fn, fn64, inputs, grad_idx, dtype, **kw):
    inputs_t = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
    # the truth sees exactly the rounded inputs
    inputs64 = [x.double() if x.is_floating_point() else x for x in inputs_t]
    b = inputs[0].shape[0]
    weights = torch.randn(b, dtype=torch.float64)
    want, want_grads = run(fn64, inputs64, grad_idx, weights)
    got, got_grads = run(fn, inputs_t, grad_idx, weights, **kw)
    assert got.dtype == torch.float32 and got.shape == (b,)
    tol = TOL[dtype] if dtype != torch.bfloat16 else 1e-5  # the math runs in fp32 on bf16-exact inputs
    assert_rel(got, want, tol, "losses")
    for i, g, w in zip(grad_idx, got_grads, want_grads):
        assert g is not None and g.dtype == inputs_t[i].dtype, i
        assert_rel(g, w, TOL[dtype], f"grad {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 11])
def test_d2o_loss(backend, dtype, k):
    torch.manual_seed(k)
    b = 37
    ps, rs = -5 * torch.rand(b, k) - 1, -5 * torch.rand(b, k) - 1
    pn, rn = -5 * torch.rand(b) - 1, -5 * torch.rand(b) - 1
    with backend_or_skip(backend):
        check(ops.d2o_loss, lambda a, b_, c, d: d2o64(a, b_, c, d, 0.3, 0.2), [ps, rs, pn, rn], (0, 2), dtype,
              beta=0.3, alpha=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_d2o_with_one_sample_and_alpha_equal_beta_is_dpo(backend):
    torch.manual_seed(0)
    b = 16
    ps, rs, pn, rn = (-5 * torch.rand(b) for _ in range(4))
    with backend_or_skip(backend):
        d2o, metrics = ops.d2o_loss(ps[:, None], rs[:, None], pn, rn, beta=0.1, alpha=0.1)
        dpo, chosen_r, rejected_r = ops.dpo_loss(ps, pn, rs, rn, beta=0.1)
    assert_rel(d2o, dpo, 1e-6, "losses")
    assert_rel(metrics["rewards/samples"], chosen_r.mean(), 1e-6)
    assert_rel(metrics["rewards/negative"], rejected_r.mean(), 1e-6)
    assert metrics["rewards/accuracies"].item() == pytest.approx((chosen_r > rejected_r).float().mean().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kto_loss(backend, dtype):
    torch.manual_seed(1)
    b = 41
    p, r = -8 * torch.rand(b), -8 * torch.rand(b)
    desirable = torch.rand(b) > 0.4
    z0 = 0.7
    with backend_or_skip(backend):
        check(lambda a, b_, d, **kw: ops.kto_loss(a, b_, d, torch.tensor(z0), **kw),
              lambda a, b_, d: kto64(a, b_, d, z0, 0.5, 1.3, 0.6), [p, r, desirable], (0,), dtype,
              beta=0.5, desirable_weight=1.3, undesirable_weight=0.6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kto_metrics_and_number_reference_point(backend):
    p = torch.tensor([-1.0, -2.0, -3.0])
    r = torch.tensor([-1.5, -1.0, -3.0])
    desirable = torch.tensor([True, False, True])
    with backend_or_skip(backend):
        losses, metrics = ops.kto_loss(p, r, desirable, 0.25, beta=0.1)
    assert metrics["kl"].item() == pytest.approx(0.25)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.1 * (0.5 + 0.0) / 2)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.1 * -1.0)
    assert losses[0].item() == pytest.approx(1 - 1 / (1 + math.exp(-0.1 * (0.5 - 0.25))), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_orpo_loss(backend, dtype):
    torch.manual_seed(2)
    b = 33
    w, l_ = -3 * torch.rand(b) - 1e-3, -3 * torch.rand(b) - 1e-3
    w[0], l_[0] = -1e-3, -0.4  # near ℓ = 0, where 1 − e^ℓ cancels
    with backend_or_skip(backend):
        check(ops.orpo_loss, lambda a, b_: orpo64(a, b_, 0.25), [w, l_], (0, 1), dtype, beta=0.25)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_cpo_loss(backend, dtype, eps):
    torch.manual_seed(3)
    b = 29
    c, r = -20 * torch.rand(b), -20 * torch.rand(b)
    with backend_or_skip(backend):
        check(ops.cpo_loss, lambda a, b_: cpo64(a, b_, 0.1, eps), [c, r], (0, 1), dtype, beta=0.1,
              label_smoothing=eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_orpo_and_cpo_metrics(backend):
    c, r = torch.tensor([-0.5, -2.0]), torch.tensor([-1.0, -1.0])
    with backend_or_skip(backend):
        _, om = ops.orpo_loss(c, r, beta=0.1)
        _, cm = ops.cpo_loss(c, r, beta=0.1)
    lo = orpo64(c.double(), r.double(), 1.0)  # −log σ(log_odds) with β = 1
    assert om["log_odds_ratio"].item() == pytest.approx((-lo).mean().item(), rel=1e-5)
    assert om["rewards/accuracies"].item() == 0.5 and cm["rewards/accuracies"].item() == 0.5
    assert cm["rewards/margins"].item() == pytest.approx(0.1 * ((-0.5 + 1.0) + (-2.0 + 1.0)) / 2)


# ------------------------------------------------------------------------------------- validation
def test_bad_inputs_name_the_argument():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="policy_sample_logps must be 2-D"):
        ops.d2o_loss(x, x, x, x)
    with pytest.raises(ValueError, match="ref_negative_logps must have shape"):
        ops.d2o_loss(torch.zeros(4, 2), torch.zeros(4, 2), x, torch.zeros(3))
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        ops.d2o_loss(torch.zeros(4, 2), torch.zeros(4, 2), x, x, alpha=0.0)
    with pytest.raises(TypeError, match="desirable must have dtype in \\(bool\\)"):
        ops.kto_loss(x, x, torch.ones(4), 0.0)
    with pytest.raises(ValueError, match="kl_ref must be 0-D"):
        ops.kto_loss(x, x, x > 0, torch.zeros(4))
    with pytest.raises(TypeError, match="kl_ref must be a finite number"):
        ops.kto_loss(x, x, x > 0, float("nan"))
    with pytest.raises(ValueError, match="undesirable_weight must be a finite number >= 0"):
        ops.kto_loss(x, x, x > 0, 0.0, undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="rejected_avg_logps must have shape"):
        ops.orpo_loss(x, torch.zeros(5))
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        ops.cpo_loss(x, x, label_smoothing=0.5)


def test_cpu_kernel_rejects_mismatched_sizes():
    if not dispatch.backends()["cpu"].available:
        pytest.skip("cpu backend unavailable")
    with pytest.raises(RuntimeError, match="sample log-probs must both be"):
        torch.ops.fastalign.d2o_fwd(torch.zeros(3, 2), torch.zeros(3, 3), torch.zeros(3), torch.zeros(3), 0.1, 0.1)
