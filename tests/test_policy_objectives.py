"""This year's policy-loss options (issue 12) on every backend, against float64 written from TRL's formulas.

The float64 truth below is TRL 1.16's ``GRPOTrainer._compute_loss`` transcribed (plus GSPO-token and
the dual clip, which TRL does not have, from their papers' formulas); it shares no code with
``fastalign.ops.policy``. Every backend (torch spec, C++, Triton in the interpreter) runs the same
cases through ``ops.policy_loss`` and through the fused-linear GRPO loss.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TRITON_DEVICE, use_triton

from fastalign import ops
from fastalign.losses import FusedLinearGRPOLoss
from fastalign.ops import dispatch

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
BACKENDS = ["torch", "cpu", "triton"]


def trl64(logp, old, adv, mask, ref=None, *, beta=0.0, eps_low=0.2, eps_high=None, loss_type="grpo", level="token",
          delta=None, dual_clip=None, bias_kl=False, token_weights=None, num_items=None, max_len=None):
    """float64 loss of TRL's _compute_loss (one process, no accumulation) and its clip metrics."""
    eps_high = eps_low if eps_high is None else eps_high
    m = mask.double()
    adv = adv[:, None] if adv.dim() == 1 else adv
    log_ratio = logp - old
    if level == "token":
        liw = log_ratio
    else:
        seq = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        liw = seq if level == "sequence" else logp - logp.detach() + seq.detach()
    coef_1 = torch.exp(liw)
    if beta:
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        if bias_kl:
            kl = kl * coef_1
    if loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=eps_high).detach() * adv * logp
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
        if dual_clip is not None:
            per_token = torch.where(adv < 0, torch.min(per_token, -dual_clip * adv), per_token)
    if token_weights is not None:
        per_token = per_token * token_weights
    if beta:
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (per_token.size(0) * max_len)
    else:
        loss = (per_token * m).sum() / (m.sum() if num_items is None else torch.tensor(float(num_items))).clamp(min=1)
    metrics = {}
    with torch.no_grad():
        def global_mean(x):
            return x.sum() / x.shape[0] if x.shape[1] == 1 else (x * m).sum() / m.sum().clamp(min=1.0)

        def seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * m).sum(-1) / m.sum(-1)

        if loss_type == "cispo":
            metrics["cispo_clip_ratio"] = global_mean(((coef_1 > eps_high) & (adv > 0)).double())
        else:
            low = ((coef_1 < 1 - eps_low) & (adv < 0)).double()
            high = ((coef_1 > 1 + eps_high) & (adv > 0)).double()
            metrics["clip_ratio/low_mean"] = global_mean(low)
            metrics["clip_ratio/high_mean"] = global_mean(high)
            metrics["clip_ratio/low_min"] = seq_mean(low).nan_to_num(nan=math.inf).min()
            metrics["clip_ratio/high_max"] = seq_mean(high).nan_to_num(nan=-math.inf).max()
        if beta:
            metrics["kl"] = global_mean(kl)
    return loss, metrics


def on_backend(name):
    if name == "triton":
        use_triton()
    elif not dispatch.backends()[name].available:
        pytest.skip(f"{name} backend unavailable")
    return dispatch.backend(name)


def inputs(seed, b=6, t=13, adv_per_token=False):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g) * 2 - 0.05
    old = logp + 0.45 * torch.randn(b, t, generator=g)  # ratios spread across every clip region
    adv = torch.randn((b, t) if adv_per_token else (b,), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[0, :3] = True
    mask[1] = False  # an empty row
    ref = logp + 0.3 * torch.randn(b, t, generator=g)
    tw = torch.rand(b, t, generator=g)
    return logp, old, adv, mask, ref, tw


CASES = {
    "gspo": dict(level="sequence", eps_low=3e-4, eps_high=4e-4),
    "gspo_wide": dict(level="sequence", eps_low=0.1, eps_high=0.15, loss_type="dapo"),
    "gspo_token": dict(level="sequence_token", eps_low=0.1, eps_high=0.15, beta=0.04),
    "cispo": dict(loss_type="cispo", eps_high=1.3),
    "cispo_sequence": dict(loss_type="cispo", eps_high=1.1, level="sequence", beta=0.05, bias_kl=True),
    # a cap below 1 clips the empty row too (its weight is exp(0)): the per-row metrics must count it
    "cispo_sequence_low_cap": dict(loss_type="cispo", eps_high=0.9, level="sequence"),
    "delta": dict(delta=1.4, eps_high=0.28, loss_type="bnpo"),
    "dual_clip": dict(dual_clip=1.3, loss_type="dr_grpo", max_len=13),
    "bias_kl": dict(beta=0.1, bias_kl=True),
    "bias_kl_sequence": dict(beta=0.1, bias_kl=True, level="sequence", eps_low=0.1, eps_high=0.2),
    "token_weights": dict(token_weights=True, beta=0.05),
    "all": dict(level="sequence", delta=1.5, dual_clip=1.2, bias_kl=True, beta=0.04, token_weights=True,
                loss_type="dapo", num_items=71),
}


def op_kwargs(case, ref, tw):
    c = CASES[case]
    out = dict(clip_low=c.get("eps_low", 0.2), clip_high=c.get("eps_high"), loss_type=c.get("loss_type", "grpo"),
               importance_sampling_level=c.get("level", "token"), delta=c.get("delta"),
               ratio_clip_c=c.get("dual_clip"), kl_bias_correction=c.get("bias_kl", False),
               max_completion_length=c.get("max_len"), num_items=c.get("num_items"))
    if c.get("beta"):
        out.update(beta=c["beta"], ref_logp=ref)
    if c.get("token_weights"):
        out["token_weights"] = tw
    return out


def truth(case, logp, old, adv, mask, ref, tw):
    c = dict(CASES[case])
    c["token_weights"] = tw.double() if c.get("token_weights") else None
    lp64 = logp.detach().double().requires_grad_()
    adv64 = adv.detach().double().requires_grad_()
    loss, metrics = trl64(lp64, old.double(), adv64, mask, ref.double(), **c)
    g_lp, g_adv = torch.autograd.grad(loss, [lp64, adv64])
    return loss, metrics, g_lp, g_adv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_policy_loss_options(backend, case, dtype):
    adv_per_token = case in ("dual_clip", "cispo")
    logp, old, adv, mask, ref, tw = inputs(hash(case) % 1000, adv_per_token=adv_per_token)
    logp, old = logp.to(dtype), old.to(dtype)  # the truth sees the same rounded values
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    lp = logp.to(dev).requires_grad_()
    a = adv.to(dev).requires_grad_()
    with on_backend(backend):
        loss, metrics = ops.policy_loss(lp, old.to(dev), a, mask.to(dev), **{
            k: (x.to(dev) if isinstance(x, torch.Tensor) else x) for k, x in op_kwargs(case, ref, tw).items()})
    g_lp, g_adv = torch.autograd.grad(loss, [lp, a])
    want, want_metrics, want_g_lp, want_g_adv = truth(case, logp, old, adv, mask, ref, tw)
    tol = TOL[dtype]
    assert abs(loss.item() - want.item()) <= tol * max(1.0, abs(want.item())), (loss.item(), want.item())
    for got, exp, what in ((g_lp, want_g_lp, "d logp"), (g_adv, want_g_adv, "d advantages")):
        err = (got.double().cpu() - exp).abs().max().item() / max(exp.abs().max().item(), 1e-12)
        assert err < tol, f"{what}: relative error {err:.2e}"
    for name, value in want_metrics.items():
        assert name in metrics, name
        assert abs(float(metrics[name]) - value.item()) <= 1e-5 + tol * abs(value.item()), (name, metrics[name], value)
    if CASES[case].get("loss_type") == "cispo":
        assert not any(k.startswith("clip_ratio/") for k in metrics)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["gspo_wide", "gspo_token", "cispo", "delta", "all"])
@pytest.mark.parametrize("chunk_size", [5, 12], ids=["rows_split", "rows_whole"])
def test_fused_grpo_loss_options(backend, case, chunk_size, monkeypatch):
    """The fused-linear loss against the same truth: chunks cut across rows (5 < a row's 9 tokens: GSPO
    takes the no-grad pre-pass) or hold whole rows (12: GSPO in one pass)."""
    import fastalign.losses.grpo as grpo_module

    pre_passes = []
    real = grpo_module._whole_rows_policy_loss
    monkeypatch.setattr(grpo_module, "_whole_rows_policy_loss", lambda *a: pre_passes.append(1) or real(*a))
    torch.manual_seed(3)
    b, t, h, vocab = 4, 9, 16, 23
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    hidden = (torch.randn(b, t, h) * 0.5).requires_grad_()
    weight = (torch.randn(vocab, h) * 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (b, t))
    labels[1, 5:] = -100
    labels[2, :] = -100
    mask = labels != -100
    with torch.no_grad():
        logits = hidden.double() @ weight.double().t()
        lp_all = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    old = (lp_all + 0.4 * torch.randn(b, t)).float()
    ref = (lp_all + 0.3 * torch.randn(b, t)).float()
    adv = torch.randn(b)
    tw = torch.rand(b, t)
    c = CASES[case]
    loss_fn = FusedLinearGRPOLoss(
        beta=c.get("beta", 0.0), loss_type=c.get("loss_type", "grpo"), epsilon_low=c.get("eps_low", 0.2),
        epsilon_high=c.get("eps_high"), importance_sampling_level=c.get("level", "token"), delta=c.get("delta"),
        ratio_clip_c=c.get("dual_clip"), kl_bias_correction=c.get("bias_kl", False), chunk_size=chunk_size)
    hd, wd = hidden.detach().to(dev).requires_grad_(), weight.detach().to(dev).requires_grad_()
    with on_backend(backend):
        loss, metrics = loss_fn(hd, wd, labels.to(dev), advantages=adv.to(dev), old_logps=old.to(dev),
                                ref_logps=ref.to(dev) if c.get("beta") else None, num_items=c.get("num_items"),
                                token_weights=tw.to(dev) if c.get("token_weights") else None)
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    lp64 = torch.log_softmax(h64 @ w64.t(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    cc = dict(c)
    cc["token_weights"] = tw.double() if c.get("token_weights") else None
    want, want_metrics = trl64(lp64, old.double(), adv.double(), mask, ref.double(), **cc)
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item())), (loss.item(), want.item())
    for got, exp, what in ((hd.grad, h64.grad, "d hidden"), (wd.grad, w64.grad, "d weight")):
        err = (got.double().cpu() - exp).abs().max().item() / max(exp.abs().max().item(), 1e-12)
        assert err < 1e-5, f"{what}: relative error {err:.2e}"
    for name, value in want_metrics.items():
        assert abs(float(metrics[name]) - value.item()) <= 1e-5, (name, metrics[name], value)
    assert len(pre_passes) == (c.get("level", "token") != "token" and chunk_size == 5)


def test_gspo_token_has_the_value_of_gspo_and_a_per_token_gradient():
    logp, old, adv, mask, _, _ = inputs(5)
    lp = logp.clone().requires_grad_()
    seq_loss, _ = ops.policy_loss(lp, old, adv, mask, importance_sampling_level="sequence", clip_low=0.1)
    tok_loss, _ = ops.policy_loss(lp, old, adv, mask, importance_sampling_level="sequence_token", clip_low=0.1)
    assert abs(seq_loss.item() - tok_loss.item()) < 1e-6
    g_seq, = torch.autograd.grad(seq_loss, lp)
    # GSPO spreads a row's gradient evenly over its tokens; GSPO-token weights each token by its own ratio
    # only through the advantage: with one advantage per row the gradients differ unless the row is uniform.
    row = g_seq[0][mask[0]]
    assert torch.allclose(row, row[0].expand_as(row))


@pytest.mark.parametrize("kwargs, name", [
    (dict(delta=1.1), "delta"),              # must exceed 1 + clip_high = 1.2
    (dict(delta=1.2), "delta"),
    (dict(ratio_clip_c=1.0), "ratio_clip_c"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level"),
    (dict(loss_type="cispo"), "clip_high"),  # CISPO's cap has no default
    (dict(loss_type="cispo", clip_high=5.0, delta=4.0), "delta"),
    (dict(kl_bias_correction=1), "kl_bias_correction"),
    (dict(token_weights=torch.ones(2, 3)), "token_weights"),
])
def test_bad_options_name_the_option(kwargs, name):
    logp, old, adv, mask, _, _ = inputs(0)
    with pytest.raises(ValueError, match=name):
        ops.policy_loss(logp, old, adv, mask, **kwargs)


@pytest.mark.parametrize("quantile", [0.0, -0.1, 1.5, "0.2"])
def test_fused_loss_rejects_a_bad_entropy_quantile(quantile):
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        FusedLinearGRPOLoss(top_entropy_quantile=quantile)(
            torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long), advantages=torch.zeros(2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_grpo_loss_entropy_mask_and_bonus(backend, level):
    """top_entropy_quantile masks the policy term to the high-entropy tokens; entropy_coef subtracts the mean
    entropy over those same tokens (TRL's effective mask and normalizer), both with gradients."""
    torch.manual_seed(5)
    b, t, h, vocab = 4, 8, 16, 19
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    hidden = torch.randn(b, t, h) * 0.6
    weight = torch.randn(vocab, h) * 0.6
    labels = torch.randint(0, vocab, (b, t))
    labels[3, 4:] = -100
    mask = labels != -100
    old = -torch.rand(b, t) * 3
    adv = torch.randn(b)
    quantile, coef = 0.3, 0.05
    loss_fn = FusedLinearGRPOLoss(loss_type="grpo", importance_sampling_level=level, epsilon_high=0.28,
                                  top_entropy_quantile=quantile, entropy_coef=coef, chunk_size=7)
    hd, wd = hidden.clone().to(dev).requires_grad_(), weight.clone().to(dev).requires_grad_()
    with on_backend(backend):
        loss, _ = loss_fn(hd, wd, labels.to(dev), advantages=adv.to(dev), old_logps=old.to(dev))
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = h64 @ w64.t()
    logprobs = torch.log_softmax(logits, -1)
    lp64 = logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    ent64 = -(logprobs.exp() * logprobs).sum(-1)
    threshold = torch.quantile(ent64.detach()[mask], 1 - quantile)
    keep = (ent64.detach() * mask >= threshold) & mask
    want, _ = trl64(lp64, old.double(), adv.double(), mask, level=level, eps_high=0.28, token_weights=keep.double())
    eff = (mask & keep).double()
    want = want - coef * (ent64 * eff).sum() / eff.sum()
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item())), (loss.item(), want.item())
    for got, exp, what in ((hd.grad, h64.grad, "d hidden"), (wd.grad, w64.grad, "d weight")):
        err = (got.double().cpu() - exp).abs().max().item() / max(exp.abs().max().item(), 1e-12)
        assert err < 1e-5, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_entropy_bonus_as_a_sum_for_token_summing_callers(level):
    """entropy_num_items=1 (the grpo flow with dapo/cispo, whose trainer divides by the global token count)
    turns the bonus into the entropy sum; the default is TRL's mean over the trained tokens."""
    torch.manual_seed(2)
    hidden, weight = torch.randn(3, 6, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, 4:] = -100
    loss_fn = FusedLinearGRPOLoss(loss_type="dapo", entropy_coef=0.1, importance_sampling_level=level)
    kw = dict(advantages=torch.randn(3), num_items=1)
    mean_loss, metrics = loss_fn(hidden, weight, labels, **kw)
    sum_loss, _ = loss_fn(hidden, weight, labels, entropy_num_items=1, **kw)
    n = int((labels != -100).sum())
    entropy_sum = metrics["entropy"].item() * n
    assert abs((mean_loss - sum_loss).item() - 0.1 * (entropy_sum - entropy_sum / n)) < 1e-5
