"""The pure-PyTorch references (the spec) against float64 formulas written out here.

Nothing here calls a reference to compute an expected value: each formula is restated in float64
(from ANCHORS.md), and gradients are analytic or come from autograd through that float64 formula.
Inputs are fresh random tensors on every run, plus hand-made edge cases with known answers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, aggregate64, assert_rel, dpo64, gae64, group_adv64, kl64, logprobs64, logprobs_grad64, std64

from fastalign.ops import reference as R
from fastalign.ops.kl import KL_KINDS
from fastalign.ops.policy import LOSS_TYPES
from fastalign.ops.policy.spec import row_scale

FP32 = TOL[torch.float32]
DTYPES = [torch.float32, torch.bfloat16]


def _labels(shape, vocab, ignore_frac=0.25, ignore_index=-100):
    labels = torch.randint(0, vocab, shape)
    return torch.where(torch.rand(shape) < ignore_frac, torch.full_like(labels, ignore_index), labels)


def _mask(shape, keep=0.7):
    m = torch.rand(shape) < keep
    m[..., 0] = True  # every row keeps at least one position
    return m


# ----------------------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,vocab,temperature", [
    ((1,), 1, 1.0), ((5,), 97, 1.0), ((3, 4), 257, 0.7), ((2, 3, 5), 1000, 1.3), ((7,), 2, 2.0),
])
def test_logprobs_from_logits(dtype, shape, vocab, temperature):
    logits = (3 * torch.randn(*shape, vocab)).to(dtype).requires_grad_()
    labels = _labels(shape, vocab)
    logp, entropy = R.logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True)
    exp_logp, exp_ent = logprobs64(logits, labels, temperature)
    assert logp.dtype == entropy.dtype == torch.float32
    assert_rel(logp, exp_logp, TOL[dtype], "logp")
    assert_rel(entropy, exp_ent, TOL[dtype], "entropy")
    assert torch.equal(R.logprobs_from_logits(logits, labels, temperature=temperature), logp)

    g_lp, g_ent = torch.randn(shape), torch.randn(shape)
    ((logp * g_lp).sum() + (entropy * g_ent).sum()).backward()
    assert_rel(logits.grad, logprobs_grad64(logits, labels, g_lp, g_ent, temperature), TOL[dtype], "d logits")


def test_logprobs_edge_cases():
    # Logits near +-1e4 (an unshifted exp overflows), a vocabulary of one, all rows ignored.
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4 + 1.0]])
    labels = torch.tensor([0, 2])
    logp, entropy = R.logprobs_from_logits(logits, labels, return_entropy=True)
    assert_rel(logp, torch.tensor([0.0, -math.log1p(2 * math.exp(-1.0))], dtype=torch.float64), FP32)
    exp_logp, exp_ent = logprobs64(logits, labels)
    assert_rel(entropy, exp_ent, FP32, "entropy")

    one = torch.randn(4, 1, requires_grad=True)
    logp, entropy = R.logprobs_from_logits(one, torch.zeros(4, dtype=torch.long), return_entropy=True)
    assert torch.equal(logp, torch.zeros(4)) and torch.equal(entropy, torch.zeros(4))
    logp.sum().backward()
    assert torch.equal(one.grad, torch.zeros(4, 1))

    ignored = torch.randn(3, 5, requires_grad=True)
    logp, entropy = R.logprobs_from_logits(ignored, torch.full((3,), -1, dtype=torch.long), ignore_index=-1,
                                           return_entropy=True)
    assert torch.equal(logp, torch.zeros(3)) and torch.equal(entropy, torch.zeros(3))
    (logp.sum() + entropy.sum()).backward()
    assert torch.equal(ignored.grad, torch.zeros(3, 5))

    # Uniform logits: logp = -log V and entropy = log V exactly in float64.
    logp, entropy = R.logprobs_from_logits(torch.zeros(2, 10), torch.tensor([3, 9]), return_entropy=True)
    assert_rel(logp, torch.full((2,), -math.log(10), dtype=torch.float64), FP32)
    assert_rel(entropy, torch.full((2,), math.log(10), dtype=torch.float64), FP32)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("n,hidden,vocab,temperature", [(1, 3, 5, 1.0), (9, 16, 131, 0.8), (4, 8, 1, 1.0)])
def test_token_logprobs(with_bias, n, hidden, vocab, temperature):
    h = torch.randn(n, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_()
    b = torch.randn(vocab, requires_grad=True) if with_bias else None
    labels = _labels((n,), vocab)
    logp, entropy = R.token_logprobs(h, w, labels, bias=b, temperature=temperature, return_entropy=True)

    logits64 = h.detach().double() @ w.detach().double().t()
    if with_bias:
        logits64 = logits64 + b.detach().double()
    exp_logp, exp_ent = logprobs64(logits64, labels, temperature)
    assert_rel(logp, exp_logp, FP32, "logp")
    assert_rel(entropy, exp_ent, FP32, "entropy")

    g_lp, g_ent = torch.randn(n), torch.randn(n)
    ((logp * g_lp).sum() + (entropy * g_ent).sum()).backward()
    dz = logprobs_grad64(logits64, labels, g_lp, g_ent, temperature)
    assert_rel(h.grad, dz @ w.detach().double(), FP32, "d hidden")
    assert_rel(w.grad, dz.t() @ h.detach().double(), FP32, "d weight")
    if with_bias:
        assert_rel(b.grad, dz.sum(0), FP32, "d bias")


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_sequence_logprobs(average, mask_dtype):
    token_logp = (-torch.rand(4, 9)).requires_grad_()
    mask = _mask((4, 9)).to(mask_dtype)
    out = R.sequence_logprobs(token_logp, mask, average=average)
    m = mask.double()
    total = (token_logp.detach().double() * m).sum(-1)
    count = m.sum(-1)
    assert_rel(out, total / count if average else total, FP32)
    g = torch.randn(4)
    (out * g).sum().backward()
    exp_grad = (g.double() / count if average else g.double()).unsqueeze(-1) * m
    assert_rel(token_logp.grad, exp_grad, FP32, "d token_logp")


# ---------------------------------------------------------------------------------------------- KL
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_penalty(kind, dtype):
    logp = (-3 * torch.rand(5, 11)).to(dtype).requires_grad_()
    ref_logp = (-3 * torch.rand(5, 11)).to(dtype).requires_grad_()
    out = R.kl_penalty(logp, ref_logp, kind=kind)
    lp64 = logp.detach().double().requires_grad_()
    value = kl64(lp64, ref_logp.detach().double(), kind)
    assert out.dtype == torch.float32
    assert_rel(out, value, TOL[dtype], kind)
    g = torch.randn(5, 11)
    (out * g).sum().backward()
    (slope,) = torch.autograd.grad(value, lp64, g.double())
    assert_rel(logp.grad, slope, TOL[dtype], f"d logp {kind}")
    assert ref_logp.grad is None  # the reference is a constant


def test_kl_penalty_zero_when_equal():
    logp = -torch.rand(3, 4)
    for kind in KL_KINDS:
        assert torch.equal(R.kl_penalty(logp, logp.clone(), kind=kind), torch.zeros(3, 4))


# -------------------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("num_groups,group", [(1, 1), (3, 1), (4, 2), (5, 8), (1, 16)])
def test_group_advantages(scale, num_groups, group, dtype):
    rewards = torch.randn(num_groups * group).to(dtype).requires_grad_()
    adv = R.group_advantages(rewards, group, scale=scale, eps=1e-4)
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
        # The gradient of (r - mean) / std cancels terms of size |g| / std (a two-sample group's
        # advantages are +-1/sqrt(2) whatever the rewards, so their true gradient is ~eps).
        std = {"group": std64(r64.detach().view(-1, group), dim=1).min(), "batch": std64(r64.detach()),
               "none": torch.ones(())}[scale]
        terms = g.abs().max().item() / (std.item() + 1e-4)
        assert_rel(rewards.grad, r64.grad, TOL[dtype], "d rewards", scale=terms)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_rewards_exactly_zero(scale):
    # Values whose float mean is not exact (0.1, 1e6 + 0.3, 1/3) and a mix with a varying group.
    for value in (0.1, 1e6 + 0.3, 1.0 / 3.0, -7.0):
        rewards = torch.full((12,), value)
        assert torch.equal(R.group_advantages(rewards, 6, scale=scale), torch.zeros(12))
    rewards = torch.cat([torch.full((4,), 0.1), torch.randn(4), torch.full((4,), 1e6 + 0.3)])
    adv = R.group_advantages(rewards, 4, scale=scale)
    assert torch.equal(adv[:4], torch.zeros(4)) and torch.equal(adv[8:], torch.zeros(4))
    assert adv[4:8].abs().sum() > 0


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_group_advantages_gradient_of_equal_rewards_is_finite(scale):
    # std has no derivative at 0; the spec takes it as 0 there, so d r = (g - mean_group(g)) / eps
    # for a group (or, with scale="batch", a whole batch) of equal rewards.
    rewards = torch.full((8,), 0.3, requires_grad=True)
    adv = R.group_advantages(rewards, 4, scale=scale, eps=1e-4)
    g = torch.randn(8)
    (adv * g).sum().backward()
    centered = (g.double().view(2, 4) - g.double().view(2, 4).mean(1, keepdim=True)).reshape(-1)
    assert_rel(rewards.grad, centered / 1e-4, FP32, "d rewards")


def test_group_advantages_known_values():
    # Group [0, 1]: mean 0.5, unbiased std sqrt(0.5) -> +-0.5 / (sqrt(0.5) + eps).
    adv = R.group_advantages(torch.tensor([0.0, 1.0]), 2, scale="group", eps=0.0)
    assert_rel(adv, torch.tensor([-1.0, 1.0], dtype=torch.float64) * 0.5 / math.sqrt(0.5), FP32)
    adv = R.group_advantages(torch.tensor([0.0, 1.0, 2.0, 3.0]), 2, scale="none")
    assert torch.equal(adv, torch.tensor([-0.5, 0.5, -0.5, 0.5]))


@pytest.mark.parametrize("num_groups,group", [(1, 2), (3, 4), (2, 7)])
def test_rloo_advantages(num_groups, group):
    rewards = torch.randn(num_groups * group, requires_grad=True)
    adv = R.rloo_advantages(rewards, group)
    r64 = rewards.detach().double().requires_grad_()
    g64 = r64.view(num_groups, group)
    others = torch.stack([torch.cat([g64[:, :i], g64[:, i + 1:]], 1).mean(1) for i in range(group)], 1)
    expected = (g64 - others).reshape(-1)
    assert_rel(adv, expected, FP32)
    g = torch.randn(num_groups * group)
    (adv * g).sum().backward()
    (expected * g.double()).sum().backward()
    assert_rel(rewards.grad, r64.grad, FP32, "d rewards")
    assert torch.equal(R.rloo_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), 3), torch.zeros(6))


def _grad(x: torch.Tensor) -> torch.Tensor:
    """x.grad, or zeros when nothing reached x (every position masked)."""
    return torch.zeros_like(x) if x.grad is None else x.grad


def _trl_ppo_gae(rewards, values, gamma, lam):
    """TRL's PPOTrainer GAE loop (right-padded; padded rewards and values already zeroed)."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("batch,length", [(1, 1), (3, 9), (2, 17)])
def test_gae_random_masks_with_holes(gamma, lam, batch, length):
    rewards = torch.randn(batch, length, requires_grad=True)
    values = torch.randn(batch, length, requires_grad=True)
    mask = torch.rand(batch, length) < 0.7
    if batch > 1:
        mask[-1] = False  # an all-masked row: zeros everywhere
    adv, ret = R.gae(rewards, values, mask, gamma=gamma, lam=lam)
    r64 = rewards.detach().double().requires_grad_()
    v64 = values.detach().double().requires_grad_()
    exp_adv, exp_ret = gae64(r64, v64, mask, gamma, lam)
    assert_rel(adv, exp_adv, FP32, "advantages")
    assert_rel(ret, exp_ret, FP32, "returns")
    assert torch.equal(adv[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(ret[~mask], torch.zeros(int((~mask).sum())))
    ga, gr = torch.randn(batch, length), torch.randn(batch, length)
    ((adv * ga).sum() + (ret * gr).sum()).backward()
    ((exp_adv * ga.double()).sum() + (exp_ret * gr.double()).sum()).backward()
    assert_rel(_grad(rewards), _grad(r64), FP32, "d rewards")
    # returns = advantages + values: d values sums terms of both signs of size |ga| + |gr|.
    terms = ga.abs().max().item() + gr.abs().max().item()
    assert_rel(_grad(values), _grad(v64), FP32, "d values", scale=terms)


def test_gae_holes_do_not_break_the_chain():
    # A masked position between two tokens is skipped: the earlier token bootstraps from the later one.
    rewards = torch.tensor([[1.0, 99.0, 2.0]])
    values = torch.tensor([[0.5, 99.0, 0.25]])
    mask = torch.tensor([[True, False, True]])
    adv, ret = R.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    a2 = 2.0 - 0.25
    a0 = (1.0 + 0.9 * 0.25 - 0.5) + 0.9 * 0.5 * a2
    assert_rel(adv, torch.tensor([[a0, 0.0, a2]], dtype=torch.float64), FP32)
    assert_rel(ret, torch.tensor([[a0 + 0.5, 0.0, a2 + 0.25]], dtype=torch.float64), FP32)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.95, 0.9)])
def test_gae_matches_trl_ppo_on_right_padding(gamma, lam):
    batch, length = 5, 12
    lengths = torch.randint(1, length + 1, (batch,))
    mask = torch.arange(length)[None, :] < lengths[:, None]
    rewards = torch.randn(batch, length) * mask
    values = torch.randn(batch, length) * mask
    adv, ret = R.gae(rewards, values, mask, gamma=gamma, lam=lam)
    trl_adv, trl_ret = _trl_ppo_gae(rewards.double(), values.double(), gamma, lam)
    assert_rel(adv, trl_adv, FP32, "advantages vs TRL")
    assert_rel(ret, trl_ret, FP32, "returns vs TRL")


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (4, 13), (37,)])
def test_whiten(shift_mean, shape):
    x = (2 + 3 * torch.randn(shape)).requires_grad_()
    mask = _mask(shape)
    out = R.whiten(x, mask, shift_mean=shift_mean, eps=1e-8)
    x64 = x.detach().double().requires_grad_()
    m = mask.double()
    n = m.sum()
    mean = (x64 * m).sum() / n
    var = ((x64 - mean) ** 2 * m).sum() / (n - 1) if n > 1 else torch.zeros((), dtype=torch.float64)
    expected = (x64 - mean) / (var + 1e-8).sqrt()
    if not shift_mean:
        expected = expected + mean
    expected = expected * m
    assert_rel(out, expected, FP32)
    assert torch.equal(out[~mask], torch.zeros(int((~mask).sum())))
    g = torch.randn(shape)
    (out * g).sum().backward()
    (expected * g.double()).sum().backward()
    # Terms of size |g| / sqrt(var + eps) cancel in the gradient (exactly so with one position).
    terms = g.abs().max().item() / math.sqrt(var.item() + 1e-8)
    assert_rel(x.grad, x64.grad, FP32, "d x", scale=terms)


# ------------------------------------------------------------------------------------ policy losses
def _policy64(logp, old, adv, mask, ref, beta, clip_low, clip_high, loss_type, max_len, num_items):
    m = mask.double()
    if adv.dim() == 1:
        adv = adv.unsqueeze(1).expand_as(logp)
    ratio = (logp - old).exp()
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    # The surrogate keeps the smaller of the two objectives; at a tie both have the same gradient.
    unclipped_obj, clipped_obj = ratio * adv, clipped * adv
    per_token = -torch.where(unclipped_obj <= clipped_obj, unclipped_obj, clipped_obj)
    kl = None
    if beta > 0:
        kl = kl64(logp, ref, "k3")
        per_token = per_token + beta * kl

    def aggregate(tok):
        return aggregate64(tok, m, loss_type, max_len, num_items)

    loss = aggregate(per_token)
    low = (ratio < 1 - clip_low) & (adv < 0)
    high = (ratio > 1 + clip_high) & (adv > 0)
    log_ratio = logp - old
    metrics = {"clip_ratio/low_mean": (low.double() * m).sum() / m.sum(),
               "clip_ratio/high_mean": (high.double() * m).sum() / m.sum(),
               "clip_ratio/region_mean": ((low | high).double() * m).sum() / m.sum(),
               "approx_kl": 0.5 * (log_ratio.square() * m).sum() / m.sum()}
    if kl is not None:
        metrics["kl"] = (kl * m).sum() / m.sum()
    # Advantages of both signs cancel in the sum: rounding is relative to the size of the terms.
    return loss, metrics, aggregate(per_token.detach().abs()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type,max_len,num_items", [
    ("grpo", None, None), ("bnpo", None, None), ("dr_grpo", None, None), ("dr_grpo", 32, None),
    ("dapo", None, None), ("dapo", None, 123),
])
@pytest.mark.parametrize("beta,clip_high,adv_per_token", [(0.0, None, False), (0.04, 0.28, True)])
def test_policy_loss(loss_type, max_len, num_items, beta, clip_high, adv_per_token, dtype):
    batch, length = 4, 10
    logp = (-2 * torch.rand(batch, length)).to(dtype).requires_grad_()
    # Ratios spread across both clip bounds so that clipping happens on each side.
    old = (logp.detach().float() + 0.5 * torch.randn(batch, length)).to(dtype)
    adv = torch.randn(batch, length) if adv_per_token else torch.randn(batch)
    adv = adv.to(dtype).requires_grad_()
    ref = (logp.detach().float() + 0.3 * torch.randn(batch, length)).to(dtype)
    mask = _mask((batch, length))
    loss, metrics = R.policy_loss(logp, old, adv, mask, ref_logp=ref, beta=beta, clip_low=0.2, clip_high=clip_high,
                                  loss_type=loss_type, max_completion_length=max_len, num_items=num_items)
    lp64 = logp.detach().double().requires_grad_()
    adv64 = adv.detach().double().requires_grad_()
    exp_loss, exp_metrics, terms = _policy64(lp64, old.double(), adv64, mask, ref.double(), beta, 0.2,
                                             0.2 if clip_high is None else clip_high, loss_type, max_len, num_items)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_rel(loss, exp_loss, TOL[dtype], "loss", scale=terms)
    # clip_ratio/low_min and high_max are checked in tests/test_policy_objectives.py
    assert set(metrics) == set(exp_metrics) | {"clip_ratio/low_min", "clip_ratio/high_max"}
    for key, value in exp_metrics.items():
        assert_rel(metrics[key], value, TOL[dtype], key)
    assert exp_metrics["clip_ratio/region_mean"] > 0  # the inputs did exercise clipping
    loss.backward()
    exp_loss.backward()
    assert_rel(logp.grad, lp64.grad, TOL[dtype], "d logp")
    assert_rel(adv.grad, adv64.grad, TOL[dtype], "d advantages")


def test_policy_loss_hand_made():
    # Policy equal to the old policy: ratio 1, loss = -mean(A) under every aggregation with a full mask.
    logp = -torch.rand(2, 3)
    adv = torch.tensor([1.0, -3.0])
    mask = torch.ones(2, 3)
    for loss_type in (lt for lt in LOSS_TYPES if lt != "cispo"):  # cispo's value is -A·logp, not the surrogate
        loss, metrics = R.policy_loss(logp, logp.clone(), adv, mask, loss_type=loss_type)
        assert_rel(loss, torch.tensor(1.0, dtype=torch.float64), FP32, loss_type)
        assert metrics["clip_ratio/region_mean"] == 0 and metrics["approx_kl"] == 0
    # grpo: an empty row contributes 0 and still counts as a sequence (mean over B).
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    loss, _ = R.policy_loss(logp, logp.clone(), adv, mask, loss_type="grpo")
    assert_rel(loss, torch.tensor(-0.5, dtype=torch.float64), FP32)
    # A ratio far above 1 + clip_high with A > 0 is clipped: loss = -(1 + clip_high) * A, no gradient.
    lp = torch.tensor([[0.0]], requires_grad=True)
    loss, metrics = R.policy_loss(lp, torch.tensor([[-1.0]]), torch.tensor([2.0]), torch.ones(1, 1), clip_high=0.28)
    assert_rel(loss, torch.tensor(-1.28 * 2.0, dtype=torch.float64), FP32)
    assert metrics["clip_ratio/region_mean"] == 1 and metrics["clip_ratio/high_mean"] == 1
    loss.backward()
    assert lp.grad.item() == 0.0


def _value64(values, old, returns, mask, clip):
    m = mask.double()
    unclipped = (values - returns) ** 2
    clipped = (torch.clamp(values, old - clip, old + clip) - returns) ** 2
    per = torch.where(clipped > unclipped, clipped, unclipped)
    metrics = {"clip_fraction": ((clipped > unclipped).double() * m).sum() / m.sum(),
               "value_mean": (values.detach() * m).sum() / m.sum()}
    return 0.5 * (per * m).sum() / m.sum(), metrics


@pytest.mark.parametrize("clip", [0.2, 0.05])
def test_value_loss(clip):
    shape = (3, 11)
    values = torch.randn(shape, requires_grad=True)
    old = values.detach() + 0.3 * torch.randn(shape)
    returns = torch.randn(shape)
    mask = _mask(shape)
    loss, metrics = R.value_loss(values, old, returns, mask, clip=clip)
    v64 = values.detach().double().requires_grad_()
    exp_loss, exp_metrics = _value64(v64, old.double(), returns.double(), mask, clip)
    assert_rel(loss, exp_loss, FP32, "loss")
    assert_rel(metrics["value_mean"], exp_metrics["value_mean"], FP32, "value_mean")
    loss.backward()
    exp_loss.backward()
    assert_rel(values.grad, v64.grad, FP32, "d values")


def test_value_loss_clip_fraction():
    # Half the tokens have old values strictly inside the clip range (clip inactive: the clipped
    # term equals the unclipped one exactly, so none may count), the rest beyond it on either side.
    shape, clip = (4, 16), 0.2
    values = torch.randn(shape)
    outside = torch.rand(shape) < 0.5
    sign = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)
    offset = torch.where(outside, sign * (clip + 0.05 + torch.rand(shape)), sign * 0.9 * clip * torch.rand(shape))
    old = values + offset
    returns = torch.randn(shape)
    mask = _mask(shape)
    _, metrics = R.value_loss(values, old, returns, mask, clip=clip)
    _, exp_metrics = _value64(values.double(), old.double(), returns.double(), mask, clip)
    assert_rel(metrics["clip_fraction"], exp_metrics["clip_fraction"], FP32, "clip_fraction")
    assert set(metrics) == {"clip_fraction", "value_mean"}


# -------------------------------------------------------------------------------- preference losses
def _logsig(x):
    return -F.softplus(-x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type,label_smoothing", [
    ("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2),
])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss(loss_type, label_smoothing, beta, dtype):
    batch = 9
    while True:
        pc, pr, rc, rr = [(-20 * torch.rand(batch)).to(dtype).requires_grad_() for _ in range(4)]
        delta = (pc.double() - rc.double()) - (pr.double() - rr.double())
        # The hinge has a kink at beta * delta = 1 where the gradient jumps; bf16 inputs are coarse
        # enough to land on it exactly. Keep the pairs clear of it.
        if loss_type != "hinge" or ((beta * delta - 1).abs() > 1e-3).all():
            break
    losses, chosen_rewards, rejected_rewards = R.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                                          label_smoothing=label_smoothing)
    pc64, pr64 = pc.detach().double().requires_grad_(), pr.detach().double().requires_grad_()
    expected = dpo64(pc64, pr64, rc.detach().double(), rr.detach().double(), beta=beta, loss_type=loss_type,
                     label_smoothing=label_smoothing)[0]
    assert losses.dtype == torch.float32 and losses.shape == (batch,)
    assert_rel(losses, expected, TOL[dtype], "losses")
    assert_rel(chosen_rewards, beta * (pc.double() - rc.double()), TOL[dtype], "chosen rewards")
    assert_rel(rejected_rewards, beta * (pr.double() - rr.double()), TOL[dtype], "rejected rewards")
    g = torch.randn(batch)
    (losses * g).sum().backward()
    (expected * g.double()).sum().backward()
    assert_rel(pc.grad, pc64.grad, TOL[dtype], "d chosen")
    assert_rel(pr.grad, pr64.grad, TOL[dtype], "d rejected")
    assert rc.grad is None and rr.grad is None


def test_dpo_loss_policy_equals_reference():
    x = -torch.rand(4)
    y = -torch.rand(4)
    expected = {"sigmoid": math.log(2), "hinge": 1.0, "ipo": (1 / (2 * 0.1)) ** 2, "robust": math.log(2)}
    for loss_type, value in expected.items():
        eps = 0.1 if loss_type == "robust" else 0.0
        losses, cr, rr = R.dpo_loss(x, y, x.clone(), y.clone(), beta=0.1, loss_type=loss_type, label_smoothing=eps)
        assert_rel(losses, torch.full((4,), value, dtype=torch.float64), FP32, loss_type)
        assert torch.equal(cr, torch.zeros(4)) and torch.equal(rr, torch.zeros(4))


@pytest.mark.parametrize("beta,gamma,label_smoothing", [(2.0, 0.5, 0.0), (2.5, 0.0, 0.1), (1.0, -0.3, 0.0)])
def test_simpo_loss(beta, gamma, label_smoothing):
    chosen = -3 * torch.rand(8)
    rejected = -3 * torch.rand(8)
    chosen.requires_grad_()
    rejected.requires_grad_()
    losses, cr, rr = R.simpo_loss(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    c64, r64 = chosen.detach().double().requires_grad_(), rejected.detach().double().requires_grad_()
    z = beta * (c64 - r64) - gamma
    expected = -(1 - label_smoothing) * _logsig(z) - label_smoothing * _logsig(-z)
    assert_rel(losses, expected, FP32, "losses")
    assert_rel(cr, beta * c64.detach(), FP32)
    assert_rel(rr, beta * r64.detach(), FP32)
    g = torch.randn(8)
    (losses * g).sum().backward()
    # d/dz [-(1 - eps) log sigma(z) - eps log sigma(-z)] = -(1 - eps) sigma(-z) + eps sigma(z).
    z = z.detach()
    dz = g.double() * (-(1 - label_smoothing) * torch.sigmoid(-z) + label_smoothing * torch.sigmoid(z))
    assert_rel(chosen.grad, beta * dz, FP32, "d chosen")
    assert_rel(rejected.grad, -beta * dz, FP32, "d rejected")


@pytest.mark.parametrize("margin_kind", ["none", "scalar", "tensor"])
@pytest.mark.parametrize("center_coef", [0.0, 0.01])
def test_bradley_terry_loss(margin_kind, center_coef):
    batch = 10
    chosen = torch.randn(batch, requires_grad=True)
    rejected = torch.randn(batch, requires_grad=True)
    margin = {"none": None, "scalar": 0.5, "tensor": torch.rand(batch)}[margin_kind]
    loss, metrics = R.bradley_terry_loss(chosen, rejected, margin=margin, center_coef=center_coef)
    c64, r64 = chosen.detach().double().requires_grad_(), rejected.detach().double().requires_grad_()
    m64 = 0.0 if margin is None else (margin.double() if isinstance(margin, torch.Tensor) else margin)
    expected = -_logsig(c64 - r64 - m64).mean() + center_coef * ((c64 + r64) ** 2).mean()
    assert_rel(loss, expected, FP32, "loss")
    assert_rel(metrics["accuracy"], (c64 > r64).double().mean(), FP32)
    # A mean of differences of both signs: rounding is relative to the rewards, not their mean.
    assert_rel(metrics["margin"], (c64 - r64).mean(), FP32, "margin", scale=(c64.abs() + r64.abs()).max().item())
    loss.backward()
    expected.backward()
    assert_rel(chosen.grad, c64.grad, FP32, "d chosen")
    assert_rel(rejected.grad, r64.grad, FP32, "d rejected")


def test_row_scale_global_counts_follow_trl_num_items_in_batch():
    # The normalizer of a micro-batch of 3 rows inside a step of 12 sequences / 50 tokens.
    counts = torch.tensor([4.0, 0.0, 6.0])
    spec = row_scale
    assert torch.allclose(spec(counts, "grpo", num_sequences=12), 1 / (12 * torch.tensor([4.0, 1.0, 6.0])))
    assert torch.allclose(spec(counts, "dr_grpo", length=8, num_sequences=12), torch.full((3,), 1 / 96))
    assert torch.allclose(spec(counts, "dapo", num_items=50), torch.full((3,), 1 / 50))
    assert torch.allclose(spec(counts, "bnpo"), torch.full((3,), 1 / 10))
    # Local defaults: the micro-batch itself.
    assert torch.allclose(spec(counts, "grpo"), 1 / (3 * torch.tensor([4.0, 1.0, 6.0])))
    assert torch.allclose(spec(counts, "dapo"), torch.full((3,), 1 / 10))
