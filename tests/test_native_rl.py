"""The native ``cpu`` backend of every RL and preference op against the torch reference.

Values and gradients, fresh random inputs each run, awkward shapes (B=1, T=1, masks with holes,
all-masked rows where the op allows them, G=1/G=2) and every loss_type / kind / scale. fp32 must
agree to a relative error < 1e-5, bf16 to < 2e-2; NaN never passes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CLIPPED_LOSS_TYPES

from fastalign import ops
from fastalign.ops import dispatch
from fastalign.ops.kl import KL_KINDS
from fastalign.ops.preference import DPO_LOSS_TYPES

pytestmark = pytest.mark.skipif(not dispatch.backends()["cpu"].available or
                                "cpu" not in dispatch.implementations("policy_loss"),
                                reason="fastalign._C with the RL ops is not built")

SHAPES = [(1, 1), (1, 7), (3, 5), (4, 33), (8, 130)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    assert not torch.isnan(got).any(), "NaN in the native result"
    assert torch.isfinite(want).all(), "the reference itself is not finite here: pick other inputs"
    scale = want.abs().max().item() if want.numel() else 0.0
    return (got - want).abs().max().item() / max(scale, 1e-30) if want.numel() else 0.0


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    flat = []
    for item in out:
        if isinstance(item, dict):
            flat += [item[k] for k in sorted(item)]
        else:
            flat += _flatten(item)
    return flat


def _keys(out):
    return [sorted(item) for item in out if isinstance(item, dict)] if isinstance(out, tuple) else []


def _run(fn, backend, inputs, grad_idx, weights, kwargs):
    xs = [x.detach().clone().requires_grad_(i in grad_idx) if isinstance(x, torch.Tensor) else x
          for i, x in enumerate(inputs)]
    with ops.backend(backend):
        out = fn(*xs, **kwargs)
    flat = _flatten(out)
    objective = sum((o * w).sum() for o, w in zip(flat, weights) if o.requires_grad)
    grads = torch.autograd.grad(objective, [xs[i] for i in grad_idx]) if grad_idx else []
    return out, flat, grads


def close(got: torch.Tensor, want: torch.Tensor, tol: float, atol: float) -> bool:
    """Relative error < tol, or within ``atol`` where the value is the small difference of O(1) terms."""
    err = rel_err(got, want)
    return err < tol or (got.double() - want.double()).abs().max().item() <= atol


def check_op(fn, inputs, grad_idx=(0,), tol=1e-5, atol=0.0, **kwargs):
    """Native vs reference: same outputs (keys included), same gradients, fp32 outputs, input-dtype grads.

    ``atol`` is for results that cancel in float32 (the reference's exp(d) - d - 1 near d = 0, the
    centered gradient of a two-sample group): there both sides carry ~1e-7 absolute rounding error.
    """
    with ops.backend("torch"):
        probe = _flatten(fn(*inputs, **kwargs))
    weights = [torch.randn(o.shape) for o in probe]
    ref_out, ref_flat, ref_grads = _run(fn, "torch", inputs, grad_idx, weights, kwargs)
    out, flat, grads = _run(fn, "cpu", inputs, grad_idx, weights, kwargs)
    assert _keys(out) == _keys(ref_out)
    assert len(flat) == len(ref_flat)
    for got, want in zip(flat, ref_flat):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert close(got, want, tol, atol), (got, want)
    for i, got, want in zip(grad_idx, grads, ref_grads):
        assert got.dtype == inputs[i].dtype
        assert close(got, want, tol, atol), (i, got, want)
    return out, grads


def holes(b, t, p=0.3, empty_rows=False):
    m = torch.rand(b, t) > p
    m[:, 0] = True  # at least one token per row, unless a row is emptied on purpose
    if empty_rows and b > 1:
        m[-1] = False
    return m


# ----------------------------------------------------------------------------------------- KL
@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_penalty(kind, shape, dtype):
    logp = (torch.randn(shape) - 1).to(dtype)
    ref = (logp.float() + 0.3 * torch.randn(shape)).to(dtype)
    check_op(ops.kl_penalty, [logp, ref], tol=TOL[dtype], atol=1e-6, kind=kind)
    # Against float64 from the same float32 d, the native k3 (expm1(d) - d) keeps full relative
    # precision near d = 0.
    d = (ref.float() - logp.float()).double()
    want = {"k1": -d, "k2": 0.5 * d * d, "k3": torch.expm1(d) - d, "abs": d.abs()}[kind]
    with ops.backend("cpu"):
        got = ops.kl_penalty(logp, ref, kind=kind)
    assert rel_err(got, want) < 1e-5


# ----------------------------------------------------------------------------------------- advantages
def group_advantages_float64(r, group_size, scale, eps):
    g = r.view(-1, group_size)
    centered = g - g.mean(1, keepdim=True)
    if scale == "group":
        centered = centered / ((g.std(1, keepdim=True) if group_size > 1 else 0.0) + eps)
    elif scale == "batch":
        centered = centered / ((r.std() if r.numel() > 1 else 0.0) + eps)
    return centered.flatten()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size,groups", [(1, 5), (2, 1), (2, 7), (3, 4), (8, 3), (16, 40)])
def test_group_advantages(scale, group_size, groups):
    n = group_size * groups
    rewards = torch.randn(n) * 2
    check_op(ops.group_advantages, [rewards, group_size], grad_idx=(), scale=scale, eps=1e-4)
    # Gradients against float64. d A / d r subtracts two terms of size |g| / (std + eps) that cancel
    # (for G = 2 exactly, up to eps), so float32 keeps ~1e-6 of that size, not of the result.
    g = torch.randn(n)
    r64 = rewards.double().requires_grad_()
    (want,) = torch.autograd.grad(group_advantages_float64(r64, group_size, scale, 1e-4), r64, g.double())
    r32 = rewards.clone().requires_grad_()
    with ops.backend("cpu"):
        (got,) = torch.autograd.grad(ops.group_advantages(r32, group_size, scale=scale, eps=1e-4), r32, g)
    if scale == "group" and group_size > 1:
        denom = rewards.view(-1, group_size).std(1).min().item() + 1e-4
    elif scale == "batch" and n > 1:
        denom = rewards.std().item() + 1e-4
    else:
        denom = 1.0
    assert not torch.isnan(got).any()
    assert (got.double() - want).abs().max().item() <= 1e-5 * g.abs().max().item() / denom


def test_group_advantages_bf16():
    rewards = torch.randn(24).to(torch.bfloat16)
    check_op(ops.group_advantages, [rewards, 4], tol=TOL[torch.bfloat16])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_rewards_exactly_zero_with_finite_gradient(scale):
    rewards = torch.randn(4).repeat_interleave(6)  # four groups of six equal rewards
    rewards.requires_grad_(True)
    with ops.backend("cpu"):
        adv = ops.group_advantages(rewards, 6, scale=scale)
    assert torch.equal(adv, torch.zeros_like(adv))
    g = torch.randn(24)
    (d,) = torch.autograd.grad(adv, rewards, g)
    # The std term vanishes at zero spread (the reference's sqrt backward is 0/0 = NaN there);
    # what remains is the centering, divided by the std + eps.
    gg = g.view(4, 6)
    centered = (gg - gg.mean(1, keepdim=True)).flatten()
    if scale == "group":
        want = centered / 1e-4
    elif scale == "batch":
        want = centered / (rewards.detach().std() + 1e-4)
    else:
        want = centered
    assert rel_err(d, want) < 1e-5


@pytest.mark.parametrize("group_size,groups", [(2, 1), (2, 5), (3, 4), (8, 9)])
def test_rloo_advantages(group_size, groups):
    check_op(ops.rloo_advantages, [torch.randn(group_size * groups), group_size])


def gae_float64(rewards, values, mask, gamma, lam):
    r, v, m = rewards.double(), values.double(), mask.bool()
    adv = torch.zeros_like(r)
    for b in range(r.shape[0]):
        running = next_value = 0.0
        for t in reversed(range(r.shape[1])):
            if m[b, t]:
                running = r[b, t].item() + gamma * next_value - v[b, t].item() + gamma * lam * running
                adv[b, t] = running
                next_value = v[b, t].item()
    return adv, torch.where(m, adv + v, torch.zeros_like(adv))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0)])
def test_gae(shape, gamma, lam):
    rewards, values = torch.randn(shape), torch.randn(shape)
    mask = holes(*shape, empty_rows=True)
    (adv, ret), _ = check_op(ops.gae, [rewards, values, mask], grad_idx=(0, 1), gamma=gamma, lam=lam)
    want_adv, want_ret = gae_float64(rewards, values, mask, gamma, lam)
    assert rel_err(adv, want_adv) < 1e-5 and rel_err(ret, want_ret) < 1e-5


def test_gae_bf16_and_int_mask():
    rewards, values = torch.randn(3, 17).to(torch.bfloat16), torch.randn(3, 17).to(torch.bfloat16)
    check_op(ops.gae, [rewards, values, holes(3, 17).to(torch.int64)], grad_idx=(0, 1), tol=TOL[torch.bfloat16])


def whiten_float64(x, mask, shift_mean, eps=1e-8):
    m = mask.double()
    n = m.sum()
    mean = (x * m).sum() / n
    var = ((x - mean) ** 2 * m).sum() / (n - 1 if n > 1 else n)
    out = (x - mean) / torch.sqrt(var + eps)
    return (out if shift_mean else out + mean) * m


def check_whiten(x, mask, shift_mean):
    check_op(ops.whiten, [x, mask], grad_idx=(), shift_mean=shift_mean)
    # Gradients against float64: with one selected sample 1/sqrt(eps) = 1e4 multiplies terms that
    # cancel, and the float32 reference loses ~4 digits there; the native kernel does not.
    g = torch.randn(x.shape)
    x64 = x.double().requires_grad_()
    (want,) = torch.autograd.grad(whiten_float64(x64, mask, shift_mean), x64, g.double())
    x32 = x.clone().requires_grad_()
    with ops.backend("cpu"):
        (got,) = torch.autograd.grad(ops.whiten(x32, mask, shift_mean=shift_mean), x32, g)
    # Relative to the size of the terms, |g| / std: with two samples the exact gradient is ~0.
    sel = x[mask.bool()]
    std = sel.std().item() if sel.numel() > 1 else 0.0
    scale = max(want.abs().max().item(), g.abs().max().item() / (std + 1e-4))
    assert not torch.isnan(got).any()
    assert (got.double() - want).abs().max().item() < 1e-5 * scale


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (8, 130)])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten(shape, shift_mean):
    x = torch.randn(shape) * 3 + 1
    mask = torch.rand(shape) > 0.3
    mask.view(-1)[0] = True
    check_whiten(x, mask, shift_mean)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_single_selected_position(shift_mean):
    x, mask = torch.randn(2, 6), torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 3] = True
    check_whiten(x, mask, shift_mean)


# ----------------------------------------------------------------------------------------- sequence sums
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logprobs(shape, average, dtype):
    token_logp = (-torch.rand(shape) * 5).to(dtype)
    mask = holes(*shape, empty_rows=not average)
    check_op(ops.sequence_logprobs, [token_logp, mask], tol=TOL[dtype], average=average)


# ----------------------------------------------------------------------------------------- policy / value
def policy_inputs(b, t, per_token_adv, dtype=torch.float32, equal_old=False):
    logp = -torch.rand(b, t) * 3
    old = logp.clone() if equal_old else logp + 0.3 * torch.randn(b, t)
    adv = torch.randn(b, t) if per_token_adv else torch.randn(b)
    ref = logp + 0.2 * torch.randn(b, t)
    return [x.to(dtype) for x in (logp, old, adv)] + [holes(b, t, empty_rows=True)], ref.to(dtype)


@pytest.mark.parametrize("loss_type", CLIPPED_LOSS_TYPES)
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("beta,kl_kind", [(0.0, "k3"), (0.04, "k3"), (0.1, "k1"), (0.1, "k2"), (0.1, "abs")])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 130)])
def test_policy_loss(loss_type, per_token_adv, beta, kl_kind, shape):
    inputs, ref = policy_inputs(*shape, per_token_adv)
    check_op(ops.policy_loss, inputs, grad_idx=(0, 2), atol=1e-6, ref_logp=ref, beta=beta, kl_kind=kl_kind,
             loss_type=loss_type, clip_high=0.28 if loss_type == "dapo" else None)


@pytest.mark.parametrize("loss_type,extra", [("dr_grpo", {"max_completion_length": 64}),
                                             ("dapo", {"num_items": 97}),
                                             ("dapo", {"num_items": torch.tensor(13.0)})])
def test_policy_loss_normalizers(loss_type, extra):
    inputs, ref = policy_inputs(4, 21, False)
    check_op(ops.policy_loss, inputs, ref_logp=ref, beta=0.05, loss_type=loss_type, **extra)


def test_policy_loss_ratio_one_ties_and_bf16():
    # logp == old_logp: ratio 1 everywhere, the two surrogate terms tie (torch splits the gradient).
    inputs, ref = policy_inputs(5, 9, True, equal_old=True)
    check_op(ops.policy_loss, inputs, grad_idx=(0, 2), ref_logp=ref, beta=0.1)
    inputs, ref = policy_inputs(5, 9, False, dtype=torch.bfloat16)
    check_op(ops.policy_loss, inputs, ref_logp=ref, beta=0.1, tol=TOL[torch.bfloat16])


@pytest.mark.parametrize("shape", [(1,), (1, 1), (3, 5), (8, 130)])
@pytest.mark.parametrize("clip", [0.2, 10.0])
def test_value_loss(shape, clip):
    values, old = torch.randn(shape), torch.randn(shape)
    returns = torch.randn(shape)
    mask = torch.rand(shape) > 0.3
    check_op(ops.value_loss, [values, old, returns, mask], clip=clip)


def test_value_loss_all_masked_and_bf16():
    z = torch.zeros(2, 3, dtype=torch.bool)
    check_op(ops.value_loss, [torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), z])
    x = [torch.randn(4, 9).to(torch.bfloat16) for _ in range(3)]
    check_op(ops.value_loss, [*x, torch.rand(4, 9) > 0.5], tol=TOL[torch.bfloat16])


# ----------------------------------------------------------------------------------------- preference
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("n", [1, 5, 64])
def test_dpo_loss(loss_type, label_smoothing, n):
    pc, pr = -torch.rand(n) * 20, -torch.rand(n) * 20
    rc, rr = pc + torch.randn(n), pr + torch.randn(n)
    beta = 0.1 if loss_type != "hinge" else 0.5
    check_op(ops.dpo_loss, [pc, pr, rc, rr], grad_idx=(0, 1), beta=beta, loss_type=loss_type,
             label_smoothing=label_smoothing)


def test_dpo_loss_bf16():
    xs = [(-torch.rand(16) * 10).to(torch.bfloat16) for _ in range(4)]
    check_op(ops.dpo_loss, xs, grad_idx=(0, 1), tol=TOL[torch.bfloat16])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("n", [1, 9, 64])
@pytest.mark.parametrize("gamma", [0.5, -1.0])
def test_simpo_loss(label_smoothing, n, gamma):
    check_op(ops.simpo_loss, [-torch.rand(n) * 2, -torch.rand(n) * 2], grad_idx=(0, 1), beta=2.0, gamma=gamma,
             label_smoothing=label_smoothing)


@pytest.mark.parametrize("margin", [None, 0.5, "tensor"])
@pytest.mark.parametrize("center_coef", [0.0, 0.01])
@pytest.mark.parametrize("n", [1, 6, 300])
def test_bradley_terry_loss(margin, center_coef, n):
    inputs = [torch.randn(n) * 2, torch.randn(n) * 2]
    # atol: the "margin" metric is a mean of O(1) differences that may cancel to near 0.
    if margin == "tensor":
        check_op(lambda c, r, m, **kw: ops.bradley_terry_loss(c, r, margin=m, **kw), [*inputs, torch.rand(n)],
                 grad_idx=(0, 1, 2), atol=1e-6, center_coef=center_coef)
    else:
        check_op(ops.bradley_terry_loss, inputs, grad_idx=(0, 1), atol=1e-6, margin=margin, center_coef=center_coef)


def test_bradley_terry_loss_bf16():
    xs = [torch.randn(33).to(torch.bfloat16) for _ in range(2)]
    check_op(ops.bradley_terry_loss, xs, grad_idx=(0, 1), tol=TOL[torch.bfloat16], center_coef=0.01)


# ----------------------------------------------------------------------------------------- dispatch, compile
def test_cpu_backend_is_the_default_for_every_op():
    for op in ("kl_penalty", "group_advantages", "rloo_advantages", "gae", "whiten", "sequence_logprobs",
               "policy_loss", "value_loss", "dpo_loss", "simpo_loss", "bradley_terry_loss"):
        if dispatch.forced_backend() is None:
            assert dispatch.select(op, torch.device("cpu"))[0] == "cpu", op


def test_fake_tensors_trace_the_policy_token_pass():
    from torch._subclasses.fake_tensor import FakeTensorMode

    (logp, old, adv, mask), ref = policy_inputs(3, 8, False)
    real = [x.float().contiguous() for x in (logp, old, adv, mask, ref, torch.ones(3))]
    with FakeTensorMode() as mode:
        lp, old_f, adv_f, mask_f, ref_f, scale = (mode.from_tensor(x) for x in real)
        loss, sums, d_logp, d_adv, d_row = ops.policy.cpu.policy_tokens_native(
            lp, old_f, adv_f, mask_f, ref_f, scale, beta=0.1, kl_kind="k3", clip_low=0.2, clip_high=0.2,
            need_adv_grad=True, row_log_ratio=scale, level="sequence")
    assert loss.shape == () and sums.shape == (3, 4) and d_logp.shape == (3, 8) and d_adv.shape == (3,)
    assert d_row.shape == (3,)
