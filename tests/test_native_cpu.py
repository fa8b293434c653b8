"""The native ``cpu`` backend (fastalign._C) of the foundation ops against float64 formulas.

logprobs_from_logits (values and gradients of logp and entropy, every input dtype, awkward shapes,
extreme logits, non-contiguous input, the in-place backward), group and RLOO advantages, GAE.
Agreement with float64 within the tolerances implies parity with the torch reference, which the
reference tests hold to the same formulas; equal-reward groups are checked bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, assert_rel, gae64, group_adv64, logprobs64, logprobs_grad64, std64

from fastalign import ops
from fastalign.ops import dispatch

pytestmark = pytest.mark.skipif(not dispatch.backends()["cpu"].available, reason="fastalign._C is not built")

LOGIT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _labels(shape, vocab, ignore_frac=0.25, ignore_index=-100):
    labels = torch.randint(0, vocab, shape)
    return torch.where(torch.rand(shape) < ignore_frac, torch.full_like(labels, ignore_index), labels)


def _check_logprobs(logits, labels, temperature=1.0, ignore_index=-100, tol=None):
    """Native values and gradients of logp and entropy against float64; returns the outputs."""
    tol = TOL[logits.dtype] if tol is None else tol
    leaf = logits.detach().clone().requires_grad_()
    with ops.backend("cpu"):
        logp, entropy = ops.logprobs_from_logits(leaf, labels, temperature=temperature, ignore_index=ignore_index,
                                                 return_entropy=True)
    exp_logp, exp_ent = logprobs64(leaf, labels, temperature, ignore_index)
    assert logp.dtype == entropy.dtype == torch.float32
    assert logp.shape == entropy.shape == labels.shape
    assert_rel(logp, exp_logp, tol, "logp")
    assert_rel(entropy, exp_ent, tol, "entropy")
    g_lp, g_ent = torch.randn(labels.shape), torch.randn(labels.shape)
    ((logp * g_lp).sum() + (entropy * g_ent).sum()).backward()
    assert leaf.grad.dtype == leaf.dtype
    assert_rel(leaf.grad, logprobs_grad64(leaf, labels, g_lp, g_ent, temperature, ignore_index), tol, "d logits")
    return logp, entropy, leaf.grad


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("shape,vocab", [((1,), 1), ((1,), 50), ((13,), 1009), ((2, 9), 256), ((3, 4), 7)])
@pytest.mark.parametrize("temperature", [1.0, 0.65])
def test_logprobs_from_logits_matches_float64(dtype, shape, vocab, temperature):
    logits = (4 * torch.randn(*shape, vocab)).to(dtype)
    _check_logprobs(logits, _labels(shape, vocab), temperature)


def test_logprobs_only_logp_requested():
    logits = torch.randn(6, 33, requires_grad=True)
    labels = _labels((6,), 33)
    with ops.backend("cpu"):
        logp = ops.logprobs_from_logits(logits, labels)
    assert isinstance(logp, torch.Tensor)
    assert_rel(logp, logprobs64(logits, labels)[0], TOL[torch.float32])
    g = torch.randn(6)
    (logp * g).sum().backward()
    assert_rel(logits.grad, logprobs_grad64(logits, labels, g, torch.zeros(6)), TOL[torch.float32], "d logits")


def test_logprobs_only_entropy_has_a_gradient():
    logits = torch.randn(5, 17, requires_grad=True)
    labels = _labels((5,), 17)
    with ops.backend("cpu"):
        _, entropy = ops.logprobs_from_logits(logits, labels, return_entropy=True)
    g = torch.randn(5)
    (entropy * g).sum().backward()
    assert_rel(logits.grad, logprobs_grad64(logits, labels, torch.zeros(5), g), TOL[torch.float32], "d logits")


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
def test_logprobs_ignored_rows(dtype):
    logits = torch.randn(4, 6, 29).to(dtype)
    labels = _labels((4, 6), 29, ignore_frac=0.5, ignore_index=-1)
    logp, entropy, grad = _check_logprobs(logits, labels, ignore_index=-1)
    ignored = labels == -1
    assert torch.equal(logp[ignored], torch.zeros(int(ignored.sum())))
    assert torch.equal(entropy[ignored], torch.zeros(int(ignored.sum())))
    assert not grad[ignored].any()


def test_logprobs_all_ignored():
    logits = torch.randn(3, 11)
    logp, entropy, grad = _check_logprobs(logits, torch.full((3,), -100))
    assert not logp.any() and not entropy.any() and not grad.any()


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.9])
def test_logprobs_extreme_logits(dtype, temperature):
    # Logits near +-1e4: an unshifted exp() overflows even in float32. At T = 1 the shift by the row
    # max is exact; z / T rounds each logit by up to 1e4 * 2^-24 ~ 6e-4 in float32 (as torch does), so
    # with T != 1 the entropy of the few near-max logits is only that good: ~1e-4 relative, not 1e-5.
    vocab = 97
    sign = torch.where(torch.rand(8, vocab) < 0.5, -1.0, 1.0)
    logits = (sign * (1e4 - 10 * torch.rand(8, vocab))).to(dtype)
    tol = None if temperature == 1.0 or dtype != torch.float32 else 1e-3
    logp, entropy, _ = _check_logprobs(logits, _labels((8,), vocab), temperature=temperature, tol=tol)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()


def test_logprobs_non_contiguous_input():
    base = torch.randn(5, 40, 2)
    logits = base[..., 0]  # stride 2 over the vocabulary
    assert not logits.is_contiguous()
    _check_logprobs(logits, _labels((5,), 40))
    transposed = torch.randn(23, 6).t()  # [6, 23] with the vocabulary strided
    _check_logprobs(transposed, _labels((6,), 23), temperature=1.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_inplace_backward(dtype):
    # A leaf: the gradient is written into the logits buffer itself.
    vocab = 61
    logits = (3 * torch.randn(7, vocab)).to(dtype)
    labels = _labels((7,), vocab)
    original = logits.clone()
    logits.requires_grad_()
    with ops.backend("cpu"):
        logp, entropy = ops.logprobs_from_logits(logits, labels, temperature=0.8, return_entropy=True,
                                                 inplace_backward=True)
    g_lp, g_ent = torch.randn(7), torch.randn(7)
    ((logp * g_lp).sum() + (entropy * g_ent).sum()).backward()
    expected = logprobs_grad64(original, labels, g_lp, g_ent, 0.8)
    assert_rel(logits.grad, expected, TOL[dtype], "d logits")
    assert_rel(logits.detach(), expected, TOL[dtype], "the logits buffer after backward")

    # Logits computed from a model: the in-place gradient flows on to the parameters.
    hidden = torch.randn(7, 8, requires_grad=True)
    weight = torch.randn(vocab, 8, requires_grad=True)
    with ops.backend("cpu"):
        logp = ops.logprobs_from_logits(hidden @ weight.t(), labels, inplace_backward=True)
    g = torch.randn(7)
    (logp * g).sum().backward()
    logits64 = hidden.detach().double() @ weight.detach().double().t()
    dz = logprobs_grad64(logits64, labels, g, torch.zeros(7))
    assert_rel(hidden.grad, dz @ weight.detach().double(), TOL[torch.float32], "d hidden")
    assert_rel(weight.grad, dz.t() @ hidden.detach().double(), TOL[torch.float32], "d weight")


def test_logprobs_native_equals_reference_on_the_same_inputs():
    logits = torch.randn(2, 5, 300)
    labels = _labels((2, 5), 300)
    out = {}
    for name in ("cpu", "torch"):
        with ops.backend(name):
            out[name] = ops.logprobs_from_logits(logits, labels, return_entropy=True, temperature=1.3)
    for native, reference in zip(out["cpu"], out["torch"]):
        assert_rel(native, reference, TOL[torch.float32])


# -------------------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("num_groups,group", [(1, 1), (5, 1), (3, 2), (4, 7), (2, 16)])
def test_group_advantages(scale, num_groups, group, dtype):
    rewards = torch.randn(num_groups * group).to(dtype).requires_grad_()
    with ops.backend("cpu"):
        adv = ops.group_advantages(rewards, group, scale=scale)
    r64 = rewards.detach().double().requires_grad_()
    expected = group_adv64(r64, group, scale, 1e-4)
    assert adv.dtype == torch.float32
    assert_rel(adv, expected, TOL[dtype], "advantages")
    if group == 1 and scale != "batch":
        assert torch.equal(adv, torch.zeros_like(adv))
    if group > 1 or scale == "none":
        g = torch.randn(num_groups * group)
        (adv * g).sum().backward()
        (expected * g.double()).sum().backward()
        std = {"group": std64(r64.detach().view(-1, group), dim=1).min(), "batch": std64(r64.detach()),
               "none": torch.ones(())}[scale]
        terms = g.abs().max().item() / (std.item() + 1e-4)  # the size of the terms that cancel
        assert rewards.grad.dtype == dtype
        assert_rel(rewards.grad, r64.grad, TOL[dtype], "d rewards", scale=terms)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_rewards_exactly_zero(scale):
    rewards = torch.cat([torch.full((5,), 0.1), torch.randn(5), torch.full((5,), 1e6 + 0.3),
                         torch.full((5,), 1.0 / 3.0)])
    with ops.backend("cpu"):
        adv = ops.group_advantages(rewards, 5, scale=scale)
    zero = torch.zeros(5)
    assert torch.equal(adv[:5], zero) and torch.equal(adv[10:15], zero) and torch.equal(adv[15:], zero)
    assert adv[5:10].abs().sum() > 0
    with ops.backend("cpu"):
        assert torch.equal(ops.group_advantages(torch.full((8,), 0.7), 4, scale=scale), torch.zeros(8))


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_group_advantages_gradient_of_equal_rewards(scale):
    # std has no derivative at 0: both backends take it as 0, d r = (g - mean_group(g)) / eps.
    equal_part = torch.full((4,), -1.7)
    rewards = torch.cat([equal_part, equal_part if scale == "batch" else torch.randn(4)]).requires_grad_()
    g = torch.randn(8)
    grads = {}
    for name in ("cpu", "torch"):
        rewards.grad = None
        with ops.backend(name):
            (ops.group_advantages(rewards, 4, scale=scale) * g).sum().backward()
        grads[name] = rewards.grad.clone()
    centered = g[:4].double() - g[:4].double().mean()
    assert_rel(grads["cpu"][:4], centered / 1e-4, TOL[torch.float32], "equal group")
    assert_rel(grads["cpu"], grads["torch"], TOL[torch.float32], "native vs reference")


@pytest.mark.parametrize("num_groups,group", [(1, 2), (6, 3), (2, 33)])
def test_rloo_advantages(num_groups, group):
    rewards = torch.randn(num_groups * group, requires_grad=True)
    with ops.backend("cpu"):
        adv = ops.rloo_advantages(rewards, group)
    r64 = rewards.detach().double().requires_grad_()
    g64 = r64.view(num_groups, group)
    expected = (g64 - (g64.sum(1, keepdim=True) - g64) / (group - 1)).reshape(-1)
    assert_rel(adv, expected, TOL[torch.float32])
    g = torch.randn(num_groups * group)
    (adv * g).sum().backward()
    (expected * g.double()).sum().backward()
    assert_rel(rewards.grad, r64.grad, TOL[torch.float32], "d rewards")


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (1.0, 1.0), (0.0, 0.5)])
@pytest.mark.parametrize("batch,length", [(1, 1), (4, 17), (3, 130)])
def test_gae_random_masks_with_holes(gamma, lam, batch, length):
    rewards = torch.randn(batch, length, requires_grad=True)
    values = torch.randn(batch, length, requires_grad=True)
    mask = torch.rand(batch, length) < 0.6
    if batch > 1:
        mask[0] = False  # an all-masked row
    with ops.backend("cpu"):
        adv, ret = ops.gae(rewards, values, mask, gamma=gamma, lam=lam)
    r64 = rewards.detach().double().requires_grad_()
    v64 = values.detach().double().requires_grad_()
    exp_adv, exp_ret = gae64(r64, v64, mask, gamma, lam)
    assert_rel(adv, exp_adv, TOL[torch.float32], "advantages")
    assert_rel(ret, exp_ret, TOL[torch.float32], "returns")
    assert not adv[~mask].any() and not ret[~mask].any()
    ga, gr = torch.randn(batch, length), torch.randn(batch, length)
    ((adv * ga).sum() + (ret * gr).sum()).backward()
    ((exp_adv * ga.double()).sum() + (exp_ret * gr.double()).sum()).backward()
    zeros = torch.zeros(batch, length, dtype=torch.float64)
    assert_rel(rewards.grad, zeros if r64.grad is None else r64.grad, TOL[torch.float32], "d rewards")
    terms = ga.abs().max().item() + gr.abs().max().item()  # returns = adv + values cancels in d values
    assert_rel(values.grad, zeros if v64.grad is None else v64.grad, TOL[torch.float32], "d values", scale=terms)


def test_gae_mask_dtypes_and_bf16():
    rewards = torch.randn(2, 9).to(torch.bfloat16)
    values = torch.randn(2, 9).to(torch.bfloat16)
    keep = torch.rand(2, 9) < 0.7
    exp_adv, exp_ret = gae64(rewards, values, keep, 0.95, 0.9)
    for mask in (keep, keep.to(torch.int64), keep.to(torch.float32)):
        with ops.backend("cpu"):
            adv, ret = ops.gae(rewards, values, mask, gamma=0.95, lam=0.9)
        assert adv.dtype == torch.float32
        assert_rel(adv, exp_adv, TOL[torch.bfloat16], "advantages")
        assert_rel(ret, exp_ret, TOL[torch.bfloat16], "returns")


def test_an_op_in_csrc_ops_is_one_file_that_registers_itself():
    """The layout behind the README's cost of a new op: csrc/ops/<op>.cpp defines and implements its ops with a
    TORCH_LIBRARY_FRAGMENT of its own, and no shared C++ file (bindings, kernel headers) names them."""
    import re
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    shared = "".join(p.read_text() for p in (csrc / "bindings.cpp", csrc / "cuda_bindings.cpp",
                                             csrc / "cpu" / "kernels.h"))
    files = sorted((csrc / "ops").glob("*.cpp"))
    assert files, "csrc/ops/ holds no op"
    for path in files:
        text = path.read_text()
        defined = re.findall(r'm\.def\("(\w+)\(', text)
        implemented = re.findall(r'm\.impl\("(\w+)"', text)
        assert "TORCH_LIBRARY_FRAGMENT(fastalign, m)" in text and defined and sorted(defined) == sorted(implemented)
        for name in defined:
            assert hasattr(torch.ops.fastalign, name), f"{name} ({path.name}) is not registered"
            assert not re.search(rf"\b{name}\b", shared), f"{name} ({path.name}) is also named in a shared file"
