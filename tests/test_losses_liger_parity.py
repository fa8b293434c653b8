"""fastalign.losses against Liger-Kernel's chunked losses (liger_kernel.chunked_loss), run on CPU.

Values and gradients (w.r.t. hidden, weight, bias) for the loss types both support: DPO sigmoid,
hinge and robust (Liger raises NotImplementedError for IPO), with and without the NLL term; SimPO;
GRPO grpo/bnpo/dr_grpo/dapo with the k3 KL against a reference computed from hidden states.
Liger's argument orders differ between its own losses (``weight, input`` for DPO/SimPO,
``input, weight`` for GRPO); ours is always ``hidden, weight, labels``. ``compiled=False`` keeps
the test fast (the math is the same). Fresh random inputs every run.
"""

from __future__ import annotations

import random

import pytest
import torch

chunked_loss = pytest.importorskip("liger_kernel.chunked_loss")

from fastalign.losses import FusedLinearDPOLoss, FusedLinearGRPOLoss, FusedLinearSimPOLoss  # noqa: E402

TOL = 1e-5


@pytest.fixture(autouse=True)
def fixed_inputs():
    # Fixed draws: a hinge pair near its kink, or a loss that is the small difference of large terms,
    # would otherwise make a 1e-5 comparison depend on the order the tests ran in.
    torch.manual_seed(0)
    random.seed(0)


def rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    assert torch.isfinite(got).all()
    return ((got - want).norm() / want.norm().clamp(min=1e-12)).item()


def inputs(rows, t, h, vocab, *, prompt=True):
    hidden = (torch.randn(rows, t, h) * 0.7).requires_grad_()
    weight = (torch.randn(vocab, h) * 2 / h ** 0.5).requires_grad_()
    bias = (torch.randn(vocab) * 0.1).requires_grad_()
    labels = torch.randint(0, vocab, (rows, t))
    for r in range(rows):
        start = random.randint(0, t // 2) if prompt else 0
        end = random.randint(start + 1, t)
        labels[r, :start] = -100
        labels[r, end:] = -100
    return hidden, weight, bias, labels


def check(ours, theirs, tensors):
    loss, liger_loss = ours, theirs
    assert rel_err(loss, liger_loss) < TOL
    got = torch.autograd.grad(loss, tensors)
    want = torch.autograd.grad(liger_loss, tensors)
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL


@pytest.mark.parametrize("loss_type,smoothing,nll", [("sigmoid", 0.0, False), ("sigmoid", 0.0, True),
                                                     ("hinge", 0.0, False), ("robust", 0.15, False)])
def test_dpo_matches_liger(loss_type, smoothing, nll):
    pairs, t, h, vocab = 3, 17, 24, 97
    hidden, weight, bias, labels = inputs(2 * pairs, t, h, vocab)
    ref_hidden = hidden.detach() + 0.3 * torch.randn_like(hidden)
    ref_weight = weight.detach() + 0.05 * torch.randn_like(weight)
    ref_bias = bias.detach() + 0.05 * torch.randn_like(bias)
    beta, alpha = 0.3, 0.7
    liger = chunked_loss.LigerFusedLinearDPOLoss(beta=beta, alpha=alpha, compute_nll_loss=nll, compiled=False,
                                                 use_ref_model=True, loss_type=loss_type, label_smoothing=smoothing)
    liger_loss, aux = liger(weight, hidden, labels, bias, ref_hidden, ref_weight, ref_bias)
    loss, metrics = FusedLinearDPOLoss(beta=beta, loss_type=loss_type, label_smoothing=smoothing,
                                       nll_coef=alpha if nll else 0.0)(
        hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    check(loss, liger_loss, (hidden, weight, bias))
    chosen_logps, rejected_logps, *_ = aux
    assert rel_err(metrics["logps/chosen"], chosen_logps.mean()) < TOL
    assert rel_err(metrics["logps/rejected"], rejected_logps.mean()) < TOL
    chosen_rewards, rejected_rewards = aux[-2], aux[-1]
    margins = chosen_rewards - rejected_rewards  # of both signs: compare on the scale of the rewards
    scale = (chosen_rewards.abs() + rejected_rewards.abs()).mean().item()
    assert abs(metrics["rewards/margins"].item() - margins.mean().item()) < TOL * scale


def test_dpo_long_pairs_chunked_by_tokens_match_liger():
    """Our recompute path (pairs longer than the budget) against Liger's whole-sequence chunks."""
    pairs, t, h, vocab = 2, 40, 16, 64
    hidden, weight, _, labels = inputs(2 * pairs, t, h, vocab, prompt=False)
    ref_hidden = hidden.detach() + 0.3 * torch.randn_like(hidden)
    liger = chunked_loss.LigerFusedLinearDPOLoss(beta=0.1, compiled=False, use_ref_model=True)
    liger_loss, _ = liger(weight, hidden, labels, None, ref_hidden, weight.detach(), None)
    loss, _ = FusedLinearDPOLoss(beta=0.1, mem_budget=7 * vocab * 4)(hidden, weight, labels, ref_hidden=ref_hidden)
    check(loss, liger_loss, (hidden, weight))


@pytest.mark.parametrize("nll", [False, True])
def test_simpo_matches_liger(nll):
    pairs, t, h, vocab = 2, 13, 20, 83
    hidden, weight, bias, labels = inputs(2 * pairs, t, h, vocab)
    beta, gamma, smoothing, alpha = 2.0, 0.6, 0.1, 0.5
    liger = chunked_loss.LigerFusedLinearSimPOLoss(beta=beta, gamma=gamma, label_smoothing=smoothing, alpha=alpha,
                                                   compute_nll_loss=nll, compiled=False)
    liger_loss, aux = liger(weight, hidden, labels, bias)
    loss, metrics = FusedLinearSimPOLoss(beta=beta, gamma=gamma, label_smoothing=smoothing,
                                         nll_coef=alpha if nll else 0.0)(hidden, weight, labels, bias=bias)
    check(loss, liger_loss, (hidden, weight, bias))
    chosen_rewards, rejected_rewards = aux[-2], aux[-1]
    assert rel_err(metrics["rewards/chosen"], chosen_rewards.mean()) < TOL
    assert rel_err(metrics["rewards/rejected"], rejected_rewards.mean()) < TOL


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_matches_liger(loss_type):
    b, t, h, vocab = 5, 11, 16, 77
    hidden, weight, bias, labels = inputs(b, t, h, vocab, prompt=False)
    mask = (labels != -100).to(torch.int64)
    ref_hidden = hidden.detach() + 0.2 * torch.randn_like(hidden)
    with torch.no_grad():
        cur = torch.log_softmax((hidden @ weight.t() + bias) / 0.7, -1).gather(
            -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    old = (cur + 0.3 * torch.randn(b, t)) * mask
    advantages = torch.randn(b)
    kw = dict(beta=0.05, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, temperature=0.7,
              max_completion_length=t + 2)
    num_items = int(mask.sum()) + 9 if loss_type == "dapo" else None
    liger = chunked_loss.LigerFusedLinearGRPOLoss(compiled=False, use_ref_model=True, **kw)
    liger_loss, liger_metrics = liger(hidden, weight, labels.clamp(min=0), mask, advantages, bias, None, old,
                                      ref_hidden, weight.detach(), bias.detach(),
                                      num_items_in_batch=None if num_items is None else torch.tensor(num_items))
    loss, metrics = FusedLinearGRPOLoss(**kw)(hidden, weight, labels, advantages=advantages, mask=mask,
                                              old_logps=old, bias=bias, ref_hidden=ref_hidden, num_items=num_items)
    scale = max(abs(liger_loss.item()), 1e-2)  # advantages of both signs cancel in the loss
    assert abs(loss.item() - liger_loss.item()) < TOL * scale
    got = torch.autograd.grad(loss, (hidden, weight, bias))
    want = torch.autograd.grad(liger_loss, (hidden, weight, bias))
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL
    kl_mean, clip_ratio = liger_metrics
    assert rel_err(metrics["kl"], kl_mean) < TOL
    assert abs(metrics["clip_ratio/region_mean"].item() - clip_ratio.item()) < 1e-6
