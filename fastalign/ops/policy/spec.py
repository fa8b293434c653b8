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
    cispo = 4    # CISPO's objective, aggregated like dapo


# -------------------------------------------------------------- this year's objectives (issue 12)
class ImportanceLevel(Kind):
    """Where the importance weight comes from (TRL's ``importance_sampling_level``)."""

    token = 0           # w_t = exp(logp_t − old_t)
    sequence = 1        # GSPO: w_i = exp(seq-mean log-ratio), its gradient through the row mean
    sequence_token = 2  # GSPO-token: exp(logp_t − sg(logp_t) + sg(seq-mean log-ratio))


class PolicyObjective(Kind):
    """The per-token surrogate the token pass computes (``cispo`` is the loss type of that name)."""

    clip = 0   # −min(w·A, clip(w)·A), with the optional two-sided (δ) and dual (c) clips
    cispo = 1  # −sg(min(w, cap))·A·logp


def objective_of(loss_type) -> str:
    return "cispo" if loss_type == "cispo" else "clip"


def sequence_log_ratio(logp, old_logp, mask):
    """Each row's mean log-ratio over its valid tokens, ``Σ m·(logp − old) / max(Σ m, 1)`` — ``[B]``."""
    m = mask.to(torch.float32)
    lr = torch.where(m != 0, logp.float() - old_logp.detach().float(), torch.zeros_like(m))
    return (lr * m).sum(1) / m.sum(1).clamp(min=1.0)


def clip_metrics(low, high, mask, *, per_row, objective="clip"):
    """TRL's clip metrics from the ``[B, T]`` indicators: global means plus ``low_min``/``high_max``.

    ``per_row`` (sequence-level weights with per-sequence advantages): each row is one value and
    rows count equally, as TRL's ``[B, 1]`` tensors; else token means over the mask. The per-row
    means of ``clip_ratio/low_min``/``high_max`` are NaN for rows without tokens and skipped, as
    TRL's ``nanmin``/``nanmax``. CISPO logs only ``cispo_clip_ratio`` (``w > cap`` and ``A > 0``).
    """
    m = mask.to(torch.float32)
    low, high = low.float(), high.float()
    if per_row:
        row_low, row_high = low[:, 0], high[:, 0]
        n = torch.tensor(float(max(low.shape[0], 1)))
        low_mean, high_mean = row_low.sum() / n, row_high.sum() / n
    else:
        counts = m.sum(1)
        row_low, row_high = (low * m).sum(1) / counts, (high * m).sum(1) / counts  # NaN on empty rows
        total = counts.sum().clamp(min=1.0)
        low_mean, high_mean = (low * m).sum() / total, (high * m).sum() / total
    if objective == "cispo":
        return {"cispo_clip_ratio": high_mean}
    nan = torch.tensor(float("nan"))
    kept_low, kept_high = row_low[~row_low.isnan()], row_high[~row_high.isnan()]
    return {"clip_ratio/low_mean": low_mean, "clip_ratio/high_mean": high_mean,
            "clip_ratio/region_mean": low_mean + high_mean,
            "clip_ratio/low_min": kept_low.min() if kept_low.numel() else nan,
            "clip_ratio/high_max": kept_high.max() if kept_high.numel() else nan}


def row_clip_metrics(row_low, row_high, counts, *, per_row, objective="clip", empty_low=None, empty_high=None):
    """:func:`clip_metrics` from each row's masked indicator counts ``[R]`` (what the token pass returns)
    instead of ``[B, T]`` indicators. ``per_row``: a row's indicator is its count over its tokens, and a
    row without tokens takes ``empty_low``/``empty_high`` (its indicators at ratio 1), as in ``[B, 1]``."""
    counts = counts.to(torch.float32)
    frac_low, frac_high = row_low / counts, row_high / counts  # NaN on empty rows
    if per_row:
        empty = counts == 0
        zero = torch.zeros_like(frac_low)
        frac_low = torch.where(empty, zero if empty_low is None else empty_low.float(), frac_low)
        frac_high = torch.where(empty, zero if empty_high is None else empty_high.float(), frac_high)
        n = float(max(counts.shape[0], 1))
        low_mean, high_mean = frac_low.sum() / n, frac_high.sum() / n
    else:
        total = counts.sum().clamp(min=1.0)
        low_mean, high_mean = row_low.sum() / total, row_high.sum() / total
    if objective == "cispo":
        return {"cispo_clip_ratio": high_mean}
    nan = torch.tensor(float("nan"), device=counts.device)
    kept_low, kept_high = frac_low[~frac_low.isnan()], frac_high[~frac_high.isnan()]
    return {"clip_ratio/low_mean": low_mean, "clip_ratio/high_mean": high_mean,
            "clip_ratio/region_mean": low_mean + high_mean,
            "clip_ratio/low_min": kept_low.min() if kept_low.numel() else nan,
            "clip_ratio/high_max": kept_high.max() if kept_high.numel() else nan}


def _masked_mean(x, m):
    return (x * m).sum() / m.sum().clamp(min=1.0)


def row_scale(counts, loss_type, max_completion_length=None, num_items=None, length=None, num_sequences=None):
    """The normalizer of each row's masked token sum: ``loss = Σ_b row_scale[b] · Σ_t mask·term``.

    The one place a loss type's aggregation is written; every backend and every fused loss uses it.
    ``counts [B]`` are the rows' valid-token counts. ``grpo``: ``1 / (N · count_b)`` (mean per
    sequence, then over sequences); ``bnpo``: ``1 / Σ counts`` (token mean over the local batch);
    ``dr_grpo``: ``1 / (N · max_completion_length)`` (default ``length``, the padded width);
    ``dapo`` and ``cispo``: ``1 / num_items``. The contract is TRL's ``num_items_in_batch``:
    ``num_items`` is the token count and ``num_sequences`` (N) the sequence count of the whole optimizer step — summed
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


def token_weights_of(mask, loss_type, max_completion_length=None, num_items=None):
    """Weight of each token's term in the policy loss: its mask times its row's :func:`row_scale`."""
    m = mask.to(torch.float32)
    return m * row_scale(m.sum(1), loss_type, max_completion_length, num_items, length=m.shape[1])[:, None]


def policy_token_terms(logp, old_logp, adv, ref_logp, *, beta, kl_kind, clip_low, clip_high, row_log_ratio=None,
                       token_weights=None, level="token", objective="clip", delta=None, dual_clip=None,
                       kl_bias_correction=False):
    """Per token: ``(term, low, high, kl, log_ratio)`` of the surrogate + β·KL (adv broadcast to logp).

    ``level``: the weight ``w`` is ``exp(logp − old)`` (``token``), ``exp(row_log_ratio)`` with the
    gradient flowing into ``row_log_ratio [B]`` (``sequence``, GSPO), or ``exp(logp − sg(logp) +
    sg(row_log_ratio))`` (``sequence_token``). ``objective`` ``clip``: ``−min(min(w, δ)·A, clip(w)·A)``,
    then for ``A < 0`` ``min(that, −c·A)`` with ``c = dual_clip``; ``cispo``: ``−sg(min(w, clip_high))·A·logp``.
    ``token_weights`` (detached) multiply the surrogate; the KL term (times ``w`` with
    ``kl_bias_correction``) comes after. ``log_ratio`` is always the token's ``logp − old``.
    """
    log_ratio = logp - old_logp.detach()
    if level == "token":
        lw = log_ratio
    elif level == "sequence":
        lw = row_log_ratio[:, None]
    elif level == "sequence_token":
        lw = logp - logp.detach() + row_log_ratio.detach()[:, None]
    else:
        raise ValueError(f"importance_sampling_level must be one of {', '.join(ImportanceLevel.names())}, "
                         f"got {level!r}")
    ratio = torch.exp(lw)
    if objective == "cispo":
        term = -torch.clamp(ratio, max=clip_high).detach() * adv * logp
        low = torch.zeros_like(term, dtype=torch.bool)
        high = (ratio > clip_high) & (adv > 0)
    else:
        clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
        term = -torch.minimum(unclipped * adv, clipped * adv)
        if dual_clip is not None:
            term = torch.where(adv < 0, torch.minimum(term, -dual_clip * adv), term)
        low = (unclipped < 1.0 - clip_low) & (adv < 0)
        high = (unclipped > 1.0 + clip_high) & (adv > 0)
    if token_weights is not None:
        term = term * token_weights.detach()
    kl = torch.zeros_like(term)
    if beta > 0.0:
        kl = kl_penalty(logp, ref_logp, kind=kl_kind)
        if kl_bias_correction:
            kl = kl * ratio
        term = term + beta * kl
    return term, low.expand_as(term), high.expand_as(term), kl, log_ratio


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
                num_items=None, importance_sampling_level="token", delta=None, ratio_clip_c=None,
                kl_bias_correction=False, token_weights=None):
    clip_high = clip_low if clip_high is None else clip_high
    m = mask.to(torch.float32)
    lp = logp.float()
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    level, objective = importance_sampling_level, objective_of(loss_type)
    row_lr = None if level == "token" else sequence_log_ratio(lp, old_logp, m)
    term, low, high, kl, log_ratio = policy_token_terms(
        lp, old_logp.float(), adv, ref_logp, beta=beta, kl_kind=kl_kind, clip_low=clip_low, clip_high=clip_high,
        row_log_ratio=row_lr, token_weights=token_weights, level=level, objective=objective, delta=delta,
        dual_clip=ratio_clip_c, kl_bias_correction=kl_bias_correction)
    on = m != 0
    loss = torch.where(on, term * token_weights_of(m, loss_type, max_completion_length, num_items),
                       torch.zeros_like(term)).sum()
    with torch.no_grad():
        sums = torch.stack([(low * m).sum(), (high * m).sum(), torch.where(on, kl * m, 0.0).sum(),
                            (torch.where(on, log_ratio, 0.0).square() * m).sum()])
        metrics = {k: x for k, x in policy_metrics(sums, m.sum(), beta).items() if not k.startswith("clip_ratio/")}
        metrics.update(clip_metrics(low, high, m, per_row=level == "sequence" and advantages.dim() == 1,
                                    objective=objective))
    return loss, metrics


def policy_tokens(logp, old_logp, advantages, mask, ref_logp, scale, *, beta, kl_kind, clip_low, clip_high,
                  need_adv_grad, row_log_ratio=None, token_weights=None, level="token", objective="clip", delta=None,
                  dual_clip=None, kl_bias_correction=False):
    """The torch backend of the policy loss's token pass (the contract every backend implements).

    ``logp``, ``old_logp``, ``mask`` ``[R, T]`` float32; ``advantages`` and ``scale`` ``[R]`` or
    ``[R, T]``; ``row_log_ratio [R]`` (the rows' mean log-ratio, needed when ``level`` is not
    ``token``) and ``token_weights [R, T]`` or None. The options are those of
    :func:`policy_token_terms`. With ``w = scale · mask``: returns ``(loss = Σ w·term, row_sums [R, 4]
    = each row's masked sums of (low, high, kl, log_ratio²), d_logp = w·∂term/∂logp [R, T], d_adv (advantages'
    shape) or None, d_row [R] = ∂loss/∂row_log_ratio (zeros unless ``level == "sequence"``))``.
    """
    on = mask != 0
    w = (scale if scale.dim() == 2 else scale[:, None]) * mask
    with torch.enable_grad():
        lp = logp.detach().requires_grad_()
        a = advantages.detach().requires_grad_(need_adv_grad)
        row = None if row_log_ratio is None else row_log_ratio.detach().float().requires_grad_(level == "sequence")
        term, low, high, kl, log_ratio = policy_token_terms(
            lp, old_logp, a if a.dim() == 2 else a[:, None], ref_logp, beta=beta, kl_kind=kl_kind,
            clip_low=clip_low, clip_high=clip_high, row_log_ratio=row, token_weights=token_weights, level=level,
            objective=objective, delta=delta, dual_clip=dual_clip, kl_bias_correction=kl_bias_correction)
        loss = torch.where(on, term * w, torch.zeros_like(term)).sum()  # NaN in padding never leaks in
        wrt = [lp] + ([a] if need_adv_grad else []) + ([row] if level == "sequence" else [])
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, wrt)]
    zero = torch.zeros_like(term)
    with torch.no_grad():
        sums = torch.stack([torch.where(on, x, zero).sum(1) for x in
                            (low.float() * mask, high.float() * mask, kl.detach() * mask,
                             log_ratio.detach().square() * mask)], dim=1)
    d_row = grads[-1] if level == "sequence" else torch.zeros(logp.shape[0], device=logp.device)
    return loss.detach(), sums, grads[0], grads[1] if need_adv_grad else None, d_row


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
