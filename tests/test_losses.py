"""fastalign.losses against a naive float64 implementation on materialized logits (the references' formulas).

Fresh random inputs every run; fp32 within 1e-5 relative, bf16 within 2e-2; NaN never passes.
Both preference paths are covered: pairs kept whole (default budget) and token-chunked pairs
(a tiny ``mem_budget`` / ``chunk_size``).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from fastalign.losses import (
    FusedLinearDPOLoss,
    FusedLinearGRPOLoss,
    FusedLinearPPOLoss,
    FusedLinearSimPOLoss,
    fused_linear_dpo_loss,
    fused_linear_grpo_loss,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# (pairs or sequences, T, H, V): a single token, odd sizes, a vocabulary that is no power of two
SHAPES = [(1, 1, 8, 5), (2, 7, 16, 50), (3, 19, 24, 131)]
# How pairs are processed: whole pairs kept (default), token-chunked with recompute, or a tiny chunk size
PATHS = [{}, {"mem_budget": 4 * 131 * 3}, {"chunk_size": 3}]


def rel_err(got, want) -> float:
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "NaN/Inf in the result"
    return ((got - want).norm() / want.norm().clamp(min=1e-12)).item()


def make_labels(rows, t, vocab, *, empty_row=None):
    """Prompt prefix and padding suffix ignored (-100), random lengths; at least one token per row."""
    labels = torch.randint(0, vocab, (rows, t))
    for r in range(rows):
        start = random.randint(0, max(0, t - 1))
        end = random.randint(start + 1, t)
        labels[r, :start] = -100
        labels[r, end:] = -100
    if empty_row is not None:
        labels[empty_row] = -100
    return labels


def make_head(rows, t, h, vocab, dtype, *, bias=False, ref=True):
    hidden = (torch.randn(rows, t, h) * 0.7).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, h) / h ** 0.5 * 2).to(dtype).requires_grad_()
    b = (torch.randn(vocab) * 0.1).to(dtype).requires_grad_() if bias else None
    ref_hidden = (hidden.detach().float() + 0.3 * torch.randn(rows, t, h)).to(dtype) if ref else None
    return hidden, weight, b, ref_hidden


def naive_logps(hidden, weight, labels, bias=None, temperature=1.0):
    """float64 per-token log-prob and entropy on materialized logits; 0 where the label is ignored."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    logp_all = torch.log_softmax(z / temperature, -1)
    valid = labels != -100
    lp = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    ent = -(logp_all.exp() * logp_all).sum(-1) * valid
    return lp, ent


def leaves64(*ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def naive_dpo(hidden, weight, labels, ref_hidden, *, bias=None, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
              nll_coef=0.0):
    lp, _ = naive_logps(hidden, weight, labels, bias)
    with torch.no_grad():
        rlp, _ = naive_logps(ref_hidden, weight, labels, bias)
    valid = (labels != -100).double()
    n = valid.sum(1).clamp(min=1) if loss_type == "ipo" else torch.ones(labels.shape[0], dtype=torch.float64)
    b = labels.shape[0] // 2
    s, rs = lp.sum(1) / n, rlp.sum(1) / n
    delta = (s[:b] - rs[:b]) - (s[b:] - rs[b:])
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    loss = losses.mean()
    if nll_coef:
        loss = loss - nll_coef * lp[:b].sum() / valid[:b].sum()
    sums, rsums = lp.sum(1).detach(), rlp.sum(1)
    cr, rr = beta * (sums[:b] - rsums[:b]), beta * (sums[b:] - rsums[b:])
    metrics = {"rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (cr - rr).mean(),
               "rewards/accuracies": (cr > rr).double().mean(), "logps/chosen": sums[:b].mean(),
               "logps/rejected": sums[b:].mean()}
    return loss, metrics


def naive_policy(hidden, weight, labels, *, advantages, old, ref_hidden=None, bias=None, mask=None, beta=0.0,
                 eps_low=0.2, eps_high=None, loss_type="dapo", max_len=None, num_items=None, temperature=1.0,
                 entropy_coef=0.0):
    eps_high = eps_low if eps_high is None else eps_high
    lp, ent = naive_logps(hidden, weight, labels, bias, temperature)
    m = (labels != -100).double()
    if mask is not None:
        m = m * mask.double()
    adv = advantages.double()
    adv = adv[:, None] if adv.dim() == 1 else adv
    ratio = torch.exp(lp - old.double())
    pt = -torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    if beta:
        with torch.no_grad():
            rlp, _ = naive_logps(ref_hidden, weight, labels, bias, temperature)
        d = rlp - lp
        pt = pt + beta * (torch.exp(d) - d - 1)
    bsz, t = labels.shape

    def aggregate(x):
        if loss_type == "grpo":
            return ((x * m).sum(1) / m.sum(1).clamp(min=1)).mean()
        if loss_type == "bnpo":
            return (x * m).sum() / m.sum().clamp(min=1)
        if loss_type == "dr_grpo":
            return (x * m).sum() / (bsz * (max_len or t))
        return (x * m).sum() / (m.sum().clamp(min=1) if num_items is None else num_items)

    loss = aggregate(pt)
    n = m.sum().clamp(min=1)
    if entropy_coef:
        loss = loss - entropy_coef * (ent * m).sum() / n
    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (adv < 0)).double()
        high = ((ratio > 1 + eps_high) & (adv > 0)).double()
        metrics = {"clip_ratio/low_mean": (low * m).sum() / n, "clip_ratio/high_mean": (high * m).sum() / n,
                   "entropy": (ent * m).sum() / n,
                   # the loss's conditioning: terms of both signs cancel, so errors scale with sum |term|
                   "scale": aggregate(pt.abs()) + entropy_coef * (ent * m).sum() / n}
    return loss, metrics


def grads(loss, *ts):
    return torch.autograd.grad(loss, [t for t in ts if t is not None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_dpo_matches_naive(loss_type, dtype):
    for (b, t, h, vocab), path in zip(SHAPES, PATHS):
        with_bias = vocab % 2 == 0
        hidden, weight, bias, ref_hidden = make_head(2 * b, t, h, vocab, dtype, bias=with_bias)
        labels = make_labels(2 * b, t, vocab)
        smoothing = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
        nll_coef = 0.3 if loss_type == "sigmoid" else 0.0
        loss, metrics = FusedLinearDPOLoss(beta=0.2, loss_type=loss_type, label_smoothing=smoothing, nll_coef=nll_coef,
                                           **path)(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden)
        got = grads(loss, hidden, weight, bias)
        h64, w64, b64 = leaves64(hidden, weight, bias)
        want_loss, want_metrics = naive_dpo(h64, w64, labels, ref_hidden, bias=b64, beta=0.2, loss_type=loss_type,
                                            label_smoothing=smoothing, nll_coef=nll_coef)
        want = grads(want_loss, h64, w64, b64)
        tol = TOL[dtype]
        assert loss.dtype == torch.float32
        assert rel_err(loss, want_loss) < tol, (b, t, h, vocab, path)
        for g, w in zip(got, want):
            assert g.dtype == dtype
            assert rel_err(g, w) < tol, (b, t, h, vocab, path)
        for key, value in want_metrics.items():
            if key == "rewards/accuracies" and dtype == torch.bfloat16:
                continue  # a near-tie may flip in bf16
            assert abs(metrics[key].item() - value.item()) <= tol * max(1.0, abs(value.item())), key
        if nll_coef:
            assert torch.isfinite(metrics["nll_loss"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_simpo_matches_naive(dtype):
    for (b, t, h, vocab), path in zip(SHAPES, PATHS):
        hidden, weight, bias, _ = make_head(2 * b, t, h, vocab, dtype, ref=False)
        labels = make_labels(2 * b, t, vocab)
        loss, metrics = FusedLinearSimPOLoss(beta=2.0, gamma=0.7, label_smoothing=0.05, nll_coef=0.5, **path)(
            hidden, weight, labels)
        got = grads(loss, hidden, weight)
        h64, w64 = leaves64(hidden, weight)
        lp, _ = naive_logps(h64, w64, labels)
        avg = lp.sum(1) / (labels != -100).sum(1)
        z = 2.0 * (avg[:b] - avg[b:]) - 0.7
        want_loss = (-0.95 * F.logsigmoid(z) - 0.05 * F.logsigmoid(-z)).mean()
        want_loss = want_loss - 0.5 * lp[:b].sum() / (labels[:b] != -100).sum()
        want = grads(want_loss, h64, w64)
        tol = TOL[dtype]
        assert rel_err(loss, want_loss) < tol
        for g, w in zip(got, want):
            assert rel_err(g, w) < tol
        assert abs(metrics["rewards/margins"].item() - (2.0 * (avg[:b] - avg[b:])).mean().item()) < tol * 10
        assert abs(metrics["logps/chosen"].item() - avg[:b].mean().item()) < tol * max(1, abs(avg[:b].mean().item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_matches_naive(loss_type, dtype):
    for (b, t, h, vocab), chunk in zip(SHAPES, [None, 4, 5]):
        b = b + 1
        hidden, weight, bias, ref_hidden = make_head(b, t, h, vocab, dtype, bias=True)
        labels = make_labels(b, t, vocab)
        mask = (torch.rand(b, t) > 0.2).to(torch.int64)
        with torch.no_grad():
            cur, _ = naive_logps(hidden, weight, labels, bias, 0.9)
        old = (cur + 0.3 * torch.randn(b, t)).float()
        adv = torch.randn(b)
        kw = dict(beta=0.05, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, temperature=0.9,
                  entropy_coef=0.01, max_completion_length=t + 3 if loss_type == "dr_grpo" else None)
        num_items = 1.7 * t * b if loss_type == "dapo" else None
        loss, metrics = FusedLinearGRPOLoss(chunk_size=chunk, **kw)(
            hidden, weight, labels, advantages=adv, mask=mask, old_logps=old, bias=bias, ref_hidden=ref_hidden,
            num_items=num_items)
        got = grads(loss, hidden, weight, bias)
        h64, w64, b64 = leaves64(hidden, weight, bias)
        want_loss, want_metrics = naive_policy(
            h64, w64, labels, advantages=adv, old=old, ref_hidden=ref_hidden, bias=b64, mask=mask, beta=0.05,
            eps_low=0.2, eps_high=0.28, loss_type=loss_type, max_len=kw["max_completion_length"], num_items=num_items,
            temperature=0.9, entropy_coef=0.01)
        want = grads(want_loss, h64, w64, b64)
        tol = TOL[dtype]
        scale = want_metrics.pop("scale").item()
        assert abs(loss.item() - want_loss.item()) <= tol * max(scale, 1e-12), (b, t, h, vocab)
        for g, w in zip(got, want):
            assert rel_err(g, w) < tol, (b, t, h, vocab)
        for key, value in want_metrics.items():
            assert abs(metrics[key].item() - value.item()) <= (tol if key == "entropy" else 0.1), key


def test_grpo_reference_given_as_logps_or_hidden_agree():
    b, t, h, vocab = 3, 11, 16, 70
    hidden, weight, _, ref_hidden = make_head(b, t, h, vocab, torch.float32)
    labels = make_labels(b, t, vocab)
    adv = torch.randn(b)
    ref_logps, _ = naive_logps(ref_hidden, weight, labels)
    loss_fn = FusedLinearGRPOLoss(beta=0.1, loss_type="grpo")
    l1, m1 = loss_fn(hidden, weight, labels, advantages=adv, ref_hidden=ref_hidden)
    g1 = grads(l1, hidden, weight)
    l2, m2 = loss_fn(hidden, weight, labels, advantages=adv, ref_logps=ref_logps.float())
    g2 = grads(l2, hidden, weight)
    assert abs(l1.item() - l2.item()) <= 1e-5 * max(abs(l1.item()), 0.1) and rel_err(m1["kl"], m2["kl"]) < 1e-5
    for a, c in zip(g1, g2):
        assert rel_err(a, c) < 1e-5


def test_ppo_per_token_advantages_match_naive():
    b, t, h, vocab = 3, 13, 16, 45
    hidden, weight, _, _ = make_head(b, t, h, vocab, torch.float32)
    labels = make_labels(b, t, vocab)
    adv = torch.randn(b, t)
    with torch.no_grad():
        cur, _ = naive_logps(hidden, weight, labels)
    old = (cur + 0.2 * torch.randn(b, t)).float()
    loss, metrics = FusedLinearPPOLoss(epsilon_low=0.2)(hidden, weight, labels, advantages=adv, old_logps=old)
    got = grads(loss, hidden, weight)
    h64, w64 = leaves64(hidden, weight)
    want_loss, want_metrics = naive_policy(h64, w64, labels, advantages=adv, old=old, loss_type="bnpo")
    want = grads(want_loss, h64, w64)
    assert abs(loss.item() - want_loss.item()) <= 1e-5 * want_metrics["scale"].item()
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
    m = (labels != -100).double()
    lr = cur - old.double()
    assert abs(metrics["approx_kl"].item() - (0.5 * lr * lr * m).sum().item() / m.sum().item()) < 1e-5
    with pytest.raises(ValueError, match="advantages must be per token"):
        FusedLinearPPOLoss()(hidden, weight, labels, advantages=torch.randn(b))


def test_dpo_reference_forms_and_separate_head_agree():
    b, t, h, vocab = 2, 9, 12, 40
    hidden, weight, bias, ref_hidden = make_head(2 * b, t, h, vocab, torch.float32, bias=True)
    ref_weight = weight.detach() + 0.1 * torch.randn(vocab, h)
    ref_bias = torch.randn(vocab) * 0.1
    labels = make_labels(2 * b, t, vocab)
    per_token, _ = naive_logps(ref_hidden, ref_weight, labels, ref_bias)
    loss_fn = FusedLinearDPOLoss(beta=0.3)
    results = []
    for kw in ({"ref_hidden": ref_hidden, "ref_weight": ref_weight, "ref_bias": ref_bias},
               {"ref_logps": per_token.float()}, {"ref_logps": per_token.sum(1).float()}):
        loss, metrics = loss_fn(hidden, weight, labels, bias=bias, **kw)
        results.append((loss, metrics["rewards/margins"], grads(loss, hidden, weight, bias)))
    for loss, margin, gs in results[1:]:
        assert rel_err(loss, results[0][0]) < 1e-5
        assert abs(margin.item() - results[0][1].item()) < 1e-5  # a mean of signed margins: absolute
        for a, c in zip(gs, results[0][2]):
            assert rel_err(a, c) < 1e-5
    # The shared head: ref_weight defaults to weight and ref_bias to bias
    loss, _ = loss_fn(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden)
    h64, w64, b64 = leaves64(hidden, weight, bias)
    want, _ = naive_dpo(h64, w64, labels, ref_hidden, bias=b64, beta=0.3)
    assert rel_err(loss, want) < 1e-5


def test_empty_sequence_counts_as_length_one():
    b, t, h, vocab = 2, 6, 8, 20
    hidden, weight, _, ref_hidden = make_head(2 * b, t, h, vocab, torch.float32)
    labels = make_labels(2 * b, t, vocab, empty_row=3)  # the second rejected sequence has no tokens
    for loss_type in ("sigmoid", "ipo"):
        loss, _ = fused_linear_dpo_loss(hidden, weight, labels, ref_hidden=ref_hidden, loss_type=loss_type)
        got = grads(loss, hidden, weight)
        h64, w64 = leaves64(hidden, weight)
        want_loss, _ = naive_dpo(h64, w64, labels, ref_hidden, loss_type=loss_type)
        assert rel_err(loss, want_loss) < 1e-5
        for g, w in zip(got, grads(want_loss, h64, w64)):
            assert rel_err(g, w) < 1e-5
        assert got[0][3].abs().sum() == 0


def test_no_grad_gives_the_same_loss_and_upstream_gradient_scales():
    b, t, h, vocab = 2, 8, 12, 33
    hidden, weight, _, ref_hidden = make_head(2 * b, t, h, vocab, torch.float32)
    labels = make_labels(2 * b, t, vocab)
    for path in PATHS:
        loss_fn = FusedLinearDPOLoss(**path)
        loss, _ = loss_fn(hidden, weight, labels, ref_hidden=ref_hidden)
        g1 = grads(loss, hidden, weight)
        with torch.no_grad():
            eval_loss, _ = loss_fn(hidden, weight, labels, ref_hidden=ref_hidden)
        assert rel_err(eval_loss, loss.detach()) < 1e-6 and eval_loss.grad_fn is None
        loss, _ = loss_fn(hidden, weight, labels, ref_hidden=ref_hidden)
        g3 = grads(-3.0 * loss, hidden, weight)
        for a, c in zip(g1, g3):
            assert rel_err(c, -3.0 * a) < 1e-6
    adv = torch.randn(2 * b)
    loss, _ = fused_linear_grpo_loss(hidden, weight, labels, advantages=adv, loss_type="grpo")
    with torch.no_grad():
        eval_loss, _ = fused_linear_grpo_loss(hidden, weight, labels, advantages=adv, loss_type="grpo")
    assert rel_err(eval_loss, loss.detach()) < 1e-6


def test_only_the_head_trains():
    b, t, h, vocab = 2, 5, 8, 30
    hidden, weight, _, ref_hidden = make_head(2 * b, t, h, vocab, torch.float32)
    labels = make_labels(2 * b, t, vocab)
    frozen = hidden.detach()
    loss, _ = FusedLinearDPOLoss()(frozen, weight, labels, ref_hidden=ref_hidden)
    loss.backward()
    h64, w64 = leaves64(frozen, weight)
    want, _ = naive_dpo(h64, w64, labels, ref_hidden)
    assert rel_err(weight.grad, grads(want, w64)[0]) < 1e-5


def _largest_allocation(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


def test_memory_never_tokens_by_vocab():
    """With a budget of a few rows, no single allocation reaches the N x V float32 logits."""
    b, t, h, vocab = 1, 128, 16, 1024
    hidden, weight, _, ref_hidden = make_head(2 * b, t, h, vocab, torch.float32)
    labels = torch.randint(0, vocab, (2 * b, t))
    n_by_v = 2 * b * t * vocab * 4
    budget = 16 * vocab * 4

    def dpo():
        loss, _ = FusedLinearDPOLoss(mem_budget=budget)(hidden, weight, labels, ref_hidden=ref_hidden)
        loss.backward()

    def grpo():
        loss, _ = FusedLinearGRPOLoss(beta=0.1, mem_budget=budget)(hidden, weight, labels,
                                                                   advantages=torch.randn(2 * b),
                                                                   ref_hidden=ref_hidden)
        loss.backward()

    for fn in (dpo, grpo):
        assert _largest_allocation(fn) < n_by_v / 8


def test_bad_inputs_name_the_argument():
    b, t, h, vocab = 2, 4, 8, 10
    hidden, weight, _, ref_hidden = make_head(2 * b, t, h, vocab, torch.float32)
    labels = make_labels(2 * b, t, vocab)
    dpo = FusedLinearDPOLoss()
    cases = [
        (ValueError, "hidden must be 3-D", lambda: dpo(hidden[0], weight, labels[0], ref_hidden=ref_hidden[0])),
        (ValueError, "weight must have shape", lambda: dpo(hidden, weight[:, :3], labels, ref_hidden=ref_hidden)),
        (TypeError, "weight must have the dtype", lambda: dpo(hidden, weight.double(), labels, ref_hidden=ref_hidden)),
        (TypeError, "labels must have dtype", lambda: dpo(hidden, weight, labels.float(), ref_hidden=ref_hidden)),
        (ValueError, "labels must be in", lambda: dpo(hidden, weight, labels.clamp(min=0) + vocab,
                                                      ref_hidden=ref_hidden)),
        (ValueError, "hidden must hold 2B sequences", lambda: dpo(hidden[:3], weight, labels[:3],
                                                                  ref_hidden=ref_hidden[:3])),
        (ValueError, "DPO needs the reference", lambda: dpo(hidden, weight, labels)),
        (ValueError, "not both", lambda: dpo(hidden, weight, labels, ref_hidden=ref_hidden,
                                             ref_logps=torch.zeros(2 * b))),
        (ValueError, "ref_logps must have shape", lambda: dpo(hidden, weight, labels, ref_logps=torch.zeros(3))),
        (ValueError, "ref_hidden must have shape", lambda: dpo(hidden, weight, labels, ref_hidden=ref_hidden[:, :2])),
        (ValueError, "ref_weight is only used", lambda: dpo(hidden, weight, labels, ref_logps=torch.zeros(2 * b),
                                                            ref_weight=weight)),
        (ValueError, "bias must have shape", lambda: dpo(hidden, weight, labels, bias=torch.zeros(3),
                                                         ref_hidden=ref_hidden)),
        (ValueError, "loss_type must be one of", lambda: FusedLinearDPOLoss(loss_type="kto")),
        (ValueError, "label_smoothing must be in", lambda: FusedLinearDPOLoss(label_smoothing=0.5)),
        (ValueError, "beta must be a finite number > 0", lambda: FusedLinearDPOLoss(beta=0.0)),
        (ValueError, "ref_hidden must be None: SimPO", lambda: FusedLinearSimPOLoss()(hidden, weight, labels,
                                                                                      ref_hidden=ref_hidden)),
        (ValueError, "advantages must have shape", lambda: FusedLinearGRPOLoss()(hidden, weight, labels,
                                                                                 advantages=torch.zeros(3))),
        (ValueError, "beta > 0 needs the reference", lambda: FusedLinearGRPOLoss(beta=0.1)(
            hidden, weight, labels, advantages=torch.zeros(2 * b))),
        (ValueError, "old_logps must have shape", lambda: FusedLinearGRPOLoss()(
            hidden, weight, labels, advantages=torch.zeros(2 * b), old_logps=torch.zeros(2 * b, t + 1))),
        (ValueError, "mask must have shape", lambda: FusedLinearGRPOLoss()(
            hidden, weight, labels, advantages=torch.zeros(2 * b), mask=torch.ones(2 * b, t + 1))),
        (ValueError, "epsilon_low must be in", lambda: FusedLinearGRPOLoss(epsilon_low=1.5)),
        (ValueError, "loss_type must be one of", lambda: FusedLinearGRPOLoss(loss_type="sum")),
        (ValueError, "chunk_size must be >= 1", lambda: FusedLinearGRPOLoss(chunk_size=0)(
            hidden, weight, labels, advantages=torch.zeros(2 * b))),
        (ValueError, "num_items must be a finite number > 0", lambda: FusedLinearGRPOLoss()(
            hidden, weight, labels, advantages=torch.zeros(2 * b), num_items=0)),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc, match=message):
            call()
