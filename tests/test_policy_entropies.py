"""The fused GRPO/PPO loss with the caller's ``entropies`` (issue 12's entropy mask without the no-grad pre-pass).

With ``top_entropy_quantile < 1`` the mask needs every valid token's entropy before any gradient: without
``entropies`` the loss runs a no-grad pass over all tokens first (4 logits GEMMs a token instead of 3). Given
the current policy's entropies (the GRPO flow has them from the rollout-time policy forward), the mask
comes from them and the loss takes its one pass: these tests check that the results (loss, gradients of
hidden, weight and bias, every metric, the entropy bonus) equal the pre-pass's and that the pre-pass does
not run, on the torch and cpu backends, fp32 and bf16, awkward shapes; then the validation.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_rel

from fastalign import ops
from fastalign.losses import FusedLinearGRPOLoss, FusedLinearPPOLoss
from fastalign.losses import grpo as grpo_loss
from fastalign.ops import dispatch
from fastalign.ops.logprobs import chunked

BACKENDS = ["torch", "cpu"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

# (batch, length, vocab, chunk_size): the vocabulary not a multiple of a chunk or block, one token, 2 rows x 1
SHAPES = {"awkward": (5, 9, 301, 7), "one_token": (1, 1, 37, None), "short": (2, 1, 53, 3)}


def on_backend(name):
    if not dispatch.backends()[name].available:
        pytest.skip(f"{name} backend unavailable")
    return dispatch.backend(name)


class PrepassCounter:
    """Counts the loss's no-grad pre-passes (chunked.linear_logprobs_no_grad, as the loss module calls it)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = chunked.linear_logprobs_no_grad

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(grpo_loss.chunked, "linear_logprobs_no_grad", counted)


def make_inputs(seed, shape, dtype, *, extra_mask=False):
    b, t, vocab, chunk = shape
    g = torch.Generator().manual_seed(seed)
    h = 12
    hidden = (torch.randn(b, t, h, generator=g) * 0.7).to(dtype)
    weight = (torch.randn(vocab, h, generator=g) * 0.7).to(dtype)
    bias = (torch.randn(vocab, generator=g) * 0.1).to(dtype)
    labels = torch.randint(0, vocab, (b, t), generator=g)
    if b >= 3:
        labels[1] = -100          # a row with no valid token
        labels[2, t // 2:] = -100  # a short row
    mask = None
    if extra_mask:
        mask = torch.rand(b, t, generator=g) > 0.2
    adv = torch.randn(b, generator=g)
    old = -torch.rand(b, t, generator=g) * 3
    ref = old + 0.2 * torch.randn(b, t, generator=g)
    tw = torch.rand(b, t, generator=g) + 0.5
    return dict(hidden=hidden, weight=weight, bias=bias, labels=labels, mask=mask, adv=adv, old=old, ref=ref, tw=tw,
                chunk=chunk)


def policy_entropies(x, temperature, garbage=float("nan")):
    """The current policy's per-token entropies, as the GRPO flow computes them (ops.token_logprobs), with
    ``garbage`` wherever the loss ignores the token (the loss must not read it)."""
    with torch.no_grad():
        _, ent = ops.token_logprobs(x["hidden"], x["weight"], x["labels"], bias=x["bias"], temperature=temperature,
                                   return_entropy=True)
    off = x["labels"] == -100
    if x["mask"] is not None:
        off = off | ~x["mask"]
    return ent.masked_fill(off, garbage)


def run_loss(loss_fn, x, entropies, **kw):
    hd = x["hidden"].clone().requires_grad_()
    wd = x["weight"].clone().requires_grad_()
    bd = x["bias"].clone().requires_grad_()
    loss, metrics = loss_fn(hd, wd, x["labels"], advantages=x["adv"], mask=x["mask"], old_logps=x["old"], bias=bd,
                            entropies=entropies, **kw)
    loss.backward()
    return loss.detach(), metrics, (hd.grad, wd.grad, bd.grad)


def assert_same(got, want, tol):
    (loss_g, met_g, grads_g), (loss_w, met_w, grads_w) = got, want
    assert_rel(loss_g, loss_w, tol, "loss", scale=1e-3)
    for what, a, b in zip(("d hidden", "d weight", "d bias"), grads_g, grads_w):
        assert_rel(a, b, tol, what, scale=1e-6)
    assert met_g.keys() == met_w.keys()
    for k in met_w:
        a, b = float(met_g[k]), float(met_w[k])
        if math.isnan(b):
            assert math.isnan(a), k
        else:
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (k, a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("coef", [0.0, 0.05])
def test_given_entropies_equal_the_prepass(backend, dtype, shape, level, coef, monkeypatch):
    seed = list(SHAPES).index(shape) * 4 + (level == "sequence") * 2 + (coef > 0)
    x = make_inputs(seed, SHAPES[shape], dtype, extra_mask=shape == "awkward")
    temperature = 0.8
    # GSPO in one pass needs whole rows in a chunk: a chunk of 16 holds every row here.
    chunk = 16 if level == "sequence" else x["chunk"]
    loss_fn = FusedLinearGRPOLoss(loss_type="grpo", importance_sampling_level=level, epsilon_high=0.28,
                                  top_entropy_quantile=0.3, entropy_coef=coef, temperature=temperature,
                                  chunk_size=chunk)
    counter = PrepassCounter(monkeypatch)
    with on_backend(backend):
        ent = policy_entropies(x, temperature)
        want = run_loss(loss_fn, x, None, token_weights=x["tw"])
        assert counter.calls == 1  # the pre-pass path really is the reference
        got = run_loss(loss_fn, x, ent, token_weights=x["tw"])
    assert counter.calls == 1, "the pre-pass ran although entropies were given"
    assert_same(got, want, TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "dr_grpo"])
def test_given_entropies_with_reference_and_summed_bonus(backend, loss_type, monkeypatch):
    """beta > 0 (reference from ref_logps), the flow's summed bonus (entropy_num_items=1), num_items=1."""
    x = make_inputs(3, SHAPES["awkward"], torch.float32)
    loss_fn = FusedLinearGRPOLoss(loss_type=loss_type, beta=0.04, top_entropy_quantile=0.5, entropy_coef=0.1,
                                  max_completion_length=9, chunk_size=5)
    counter = PrepassCounter(monkeypatch)
    kw = dict(ref_logps=x["ref"], entropy_num_items=1, num_items=1 if loss_type == "dapo" else None)
    with on_backend(backend):
        ent = policy_entropies(x, 1.0, garbage=float("inf"))
        want = run_loss(loss_fn, x, None, **kw)
        got = run_loss(loss_fn, x, ent, **kw)
    assert counter.calls == 1
    assert_same(got, want, TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gspo_rows_longer_than_a_chunk_keep_the_prepass_with_the_given_mask(backend, monkeypatch):
    """GSPO whose rows do not fit one chunk still needs the no-grad pass (for the row log-ratios); the mask
    then comes from the given entropies, with the same results."""
    x = make_inputs(4, SHAPES["awkward"], torch.float32)
    loss_fn = FusedLinearGRPOLoss(importance_sampling_level="sequence", top_entropy_quantile=0.4, entropy_coef=0.05,
                                  chunk_size=3)
    counter = PrepassCounter(monkeypatch)
    with on_backend(backend):
        ent = policy_entropies(x, 1.0)
        want = run_loss(loss_fn, x, None)
        got = run_loss(loss_fn, x, ent)
    assert counter.calls == 2  # one pass each: rows of up to 9 tokens never fit a chunk of 3
    assert_same(got, want, TOL[torch.float32])


def test_the_mask_comes_from_the_given_entropies(monkeypatch):
    """Entropies that rank the tokens differently from the policy's change which tokens train (the mask is
    theirs), and the entropy metric stays the policy's own (the in-pass one)."""
    x = make_inputs(5, SHAPES["awkward"], torch.float32)
    loss_fn = FusedLinearGRPOLoss(loss_type="bnpo", top_entropy_quantile=0.3, chunk_size=7)
    ent = policy_entropies(x, 1.0, garbage=0.0)
    _, met_true, grads_true = run_loss(loss_fn, x, ent)
    _, met_flip, grads_flip = run_loss(loss_fn, x, -ent)
    assert abs(float(met_true["entropy"]) - float(met_flip["entropy"])) < 1e-6
    assert (grads_true[0] - grads_flip[0]).abs().max() > 1e-4


def test_ppo_loss_takes_entropies(monkeypatch):
    x = make_inputs(6, SHAPES["awkward"], torch.float32)
    x["adv"] = torch.randn(x["labels"].shape)
    loss_fn = FusedLinearPPOLoss(top_entropy_quantile=0.5, entropy_coef=0.02, chunk_size=4)
    counter = PrepassCounter(monkeypatch)
    want = run_loss(loss_fn, x, None)
    got = run_loss(loss_fn, x, policy_entropies(x, 1.0))
    assert counter.calls == 1
    assert_same(got, want, TOL[torch.float32])


def test_entropies_unused_without_a_quantile(monkeypatch):
    """top_entropy_quantile == 1: entropies are validated and unused (no mask, the bonus over every token)."""
    x = make_inputs(7, SHAPES["awkward"], torch.float32)
    loss_fn = FusedLinearGRPOLoss(entropy_coef=0.05, chunk_size=7)
    want = run_loss(loss_fn, x, None)
    got = run_loss(loss_fn, x, torch.zeros(x["labels"].shape))
    assert_same(got, want, 0.0 + 1e-12)


@pytest.mark.parametrize("entropies, error", [
    (torch.zeros(2, 4), ValueError),                    # not labels' shape
    (torch.zeros(2, 3, 1), ValueError),
    (torch.zeros(2, 3, dtype=torch.long), TypeError),   # not float (dtype errors are TypeErrors, as every arg)
    ([[0.0] * 3] * 2, TypeError),
    (torch.zeros(2, 3, device="meta"), ValueError),     # not hidden's device
])
@pytest.mark.parametrize("quantile", [0.5, 1.0])
def test_bad_entropies_name_the_argument(entropies, error, quantile):
    loss_fn = FusedLinearGRPOLoss(top_entropy_quantile=quantile)
    with pytest.raises(error, match="entropies"):
        loss_fn(torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long),
                advantages=torch.zeros(2), entropies=entropies)
