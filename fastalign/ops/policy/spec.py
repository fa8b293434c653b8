"""Spec: clipped policy-gradient loss (PPO/GRPO family) and clipped value loss."""

from __future__ import annotations

import torch

from ..kinds import Kind
from ..kl.spec import kl_penalty

__all__ = ["policy_loss", "value_loss"]  # gathered by fastalign.ops.reference


class PolicyLossType(Kind):
    """How the per-token terms of the policy loss are aggregated (the normalizer of each token)."""

    grpo = 0     # mean over each sequence's tokens, then over sequences
    bnpo = 1     # token mean over the local batch
    dr_grpo = 2  # sum / (B · max_completion_length)
    dapo = 3     # sum / num_items, the global token count


def _masked_mean(x, m):
    return (x * m).sum() / m.sum().clamp(min=1.0)


def row_scale(counts, loss_type, max_completion_length=None, num_items=None, length=None, num_sequences=None):
    """The normalizer of each row's masked token sum: ``loss = Σ_b row_scale[b] · Σ_t mask·term``.

    The one place a loss type's aggregation is written; every backend and every fused loss uses it.
    ``counts [B]`` are the rows' valid-token counts. ``grpo``: ``1 / (N · count_b)`` (mean per
    sequence, then over sequences); ``bnpo``: ``1 / Σ counts`` (token mean over the local batch);
    ``dr_grpo``: ``1 / (N · max_completion_length)`` (default ``length``, the padded width);
    ``dapo``: ``1 / num_items``. The contract is TRL's ``num_items_in_batch``: ``num_items`` is the
    token count and ``num_sequences`` (N) the sequence count of the whole optimizer step — summed
    over processes and accumulation steps — and default to the local batch's; a trainer that sums
    the losses of its micro-batches and divides once (``fastalign.engine.trainer``) passes 1.
    A count of 0 counts as 1.
    """
    counts = counts.to(torch.float32)
    batch = counts.shape[0] if num_sequences is None else num_sequences
    loss_type = PolicyLossType(PolicyLossType.code(loss_type, "loss_type"))
    rows = counts.shape[0]
    if loss_type == PolicyLossType.grpo:
        return 1.0 / (counts.clamp(min=1.0) * batch)
    if loss_type == PolicyLossType.bnpo:
        return (1.0 / counts.sum().clamp(min=1.0)).expand(rows)
    if loss_type == PolicyLossType.dr_grpo:
        width = length if max_completion_length is None else max_completion_length
        return counts.new_full((rows,), 1.0 / (batch * width))
    total = counts.sum() if num_items is None else torch.as_tensor(num_items, dtype=torch.float32,
                                                                   device=counts.device)
    return (1.0 / total.clamp(min=1.0)).expand(rows)


def token_weights(mask, loss_type, max_completion_length=None, num_items=None):
    """Weight of each token's term in the policy loss: its mask times its row's :func:`row_scale`."""
    m = mask.to(torch.float32)
    return m * row_scale(m.sum(1), loss_type, max_completion_length, num_items, length=m.shape[1])[:, None]


def policy_token_terms(logp, old_logp, adv, ref_logp, *, beta, kl_kind, clip_low, clip_high):
    """Per token: ``(term, low, high, kl, log_ratio)`` of the clipped surrogate + β·KL (adv broadcast to logp)."""
    log_ratio = logp - old_logp.detach()
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    term = -torch.minimum(ratio * adv, clipped * adv)
    kl = torch.zeros_like(term)
    if beta > 0.0:
        kl = kl_penalty(logp, ref_logp, kind=kl_kind)
        term = term + beta * kl
    low = (ratio < 1.0 - clip_low) & (adv < 0)
    high = (ratio > 1.0 + clip_high) & (adv > 0)
    return term, low, high, kl, log_ratio


def policy_metrics(sums, count, beta):
    """TRL's metric names from the masked sums ``(low, high, kl, log_ratio²)`` over ``count`` tokens."""
    n = torch.as_tensor(count, dtype=torch.float32).clamp(min=1.0)
    metrics = {"clip_ratio/low_mean": sums[0] / n, "clip_ratio/high_mean": sums[1] / n,
               "clip_ratio/region_mean": (sums[0] + sums[1]) / n, "approx_kl": 0.5 * sums[3] / n}
    if beta > 0.0:
        metrics["kl"] = sums[2] / n
    return metrics


def policy_loss(logp, old_logp, advantages, mask, *, ref_logp=None, beta=0.0, kl_kind="k3",
                clip_low=0.2, clip_high=None, loss_type="grpo", max_completion_length=None,
                num_items=None):
    clip_high = clip_low if clip_high is None else clip_high
    m = mask.to(torch.float32)
    lp = logp.float()
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    term, low, high, kl, log_ratio = policy_token_terms(lp, old_logp.float(), adv, ref_logp, beta=beta,
                                                        kl_kind=kl_kind, clip_low=clip_low, clip_high=clip_high)
    loss = (term * token_weights(m, loss_type, max_completion_length, num_items)).sum()
    with torch.no_grad():
        sums = torch.stack([(low * m).sum(), (high * m).sum(), (kl * m).sum(), (log_ratio.square() * m).sum()])
        metrics = policy_metrics(sums, m.sum(), beta)
    return loss, metrics


def policy_tokens(logp, old_logp, advantages, mask, ref_logp, scale, *, beta, kl_kind, clip_low, clip_high,
                  need_adv_grad):
    """The torch backend of the policy loss's token pass (the contract every backend implements).

    ``logp``, ``old_logp``, ``mask`` ``[R, T]`` float32; ``advantages`` and ``scale`` ``[R]`` or
    ``[R, T]``. With ``w = scale · mask``: returns ``(loss = Σ w·term, sums [4] = masked sums of
    (low, high, kl, log_ratio²), d_logp = w·∂term/∂logp [R, T], d_adv (advantages' shape) or None)``.
    """
    on = mask != 0
    w = (scale if scale.dim() == 2 else scale[:, None]) * mask
    with torch.enable_grad():
        lp = logp.detach().requires_grad_()
        a = advantages.detach().requires_grad_(need_adv_grad)
        term, low, high, kl, log_ratio = policy_token_terms(
            lp, old_logp, a if a.dim() == 2 else a[:, None], ref_logp, beta=beta, kl_kind=kl_kind,
            clip_low=clip_low, clip_high=clip_high)
        loss = torch.where(on, term * w, torch.zeros_like(term)).sum()  # NaN in padding never leaks in
        grads = torch.autograd.grad(loss, [lp, a] if need_adv_grad else [lp])
    zero = torch.zeros_like(term)
    with torch.no_grad():
        sums = torch.stack([torch.where(on, x, zero).sum() for x in
                            (low.float() * mask, high.float() * mask, kl.detach() * mask,
                             log_ratio.detach().square() * mask)])
    return loss.detach(), sums, grads[0], grads[1] if need_adv_grad else None


def value_loss(values, old_values, returns, mask, *, clip=0.2):
    m = mask.to(torch.float32)
    v = values.float()
    old = old_values.detach().float()
    ret = returns.detach().float()
    # clamp(v, old ± clip) is exactly v inside the range; old + clamp(v - old) would round away from v
    # there and count a rounding tie as clipped.
    v_clipped = torch.clamp(v, old - clip, old + clip)
    unclipped = (v - ret) ** 2
    clipped = (v_clipped - ret) ** 2
    loss = 0.5 * _masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        metrics = {
            "clip_fraction": _masked_mean((clipped > unclipped).float(), m),
            "value_mean": _masked_mean(v, m),
        }
    return loss, metrics
