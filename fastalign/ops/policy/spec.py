"""Spec: clipped policy-gradient loss (PPO/GRPO family) and clipped value loss."""

from __future__ import annotations

import torch

from ..kinds import Kind
from ..kl.spec import kl_penalty


class PolicyLossType(Kind):
    """How the per-token terms of the policy loss are aggregated (the normalizer of each token)."""

    grpo = 0     # mean over each sequence's tokens, then over sequences
    bnpo = 1     # token mean over the local batch
    dr_grpo = 2  # sum / (B · max_completion_length)
    dapo = 3     # sum / num_items, the global token count


def _masked_mean(x, m):
    return (x * m).sum() / m.sum().clamp(min=1.0)


def token_weights(mask, loss_type, max_completion_length=None, num_items=None):
    """Weight of each token's term in the policy loss: its mask over the loss type's normalizer.

    ``grpo``: mean over each sequence's tokens, then over sequences; ``bnpo``: token mean over the
    local batch; ``dr_grpo``: constant batch x max completion length; ``dapo``: the global token
    count ``num_items`` (summed over processes and accumulation steps; default the local count).
    """
    m = mask.to(torch.float32)
    batch, length = m.shape
    if loss_type == "grpo":
        return m / (m.sum(1, keepdim=True).clamp(min=1.0) * batch)
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return m / (batch * (length if max_completion_length is None else max_completion_length))
    count = m.sum() if num_items is None else torch.as_tensor(num_items, dtype=torch.float32, device=m.device)
    return m / count.clamp(min=1.0)


def policy_loss(logp, old_logp, advantages, mask, *, ref_logp=None, beta=0.0, kl_kind="k3",
                clip_low=0.2, clip_high=None, loss_type="grpo", max_completion_length=None,
                num_items=None):
    clip_high = clip_low if clip_high is None else clip_high
    m = mask.to(torch.float32)
    lp = logp.float()
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    ratio = torch.exp(lp - old_logp.detach().float())
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = None
    if beta > 0.0:
        kl = kl_penalty(lp, ref_logp, kind=kl_kind)
        per_token = per_token + beta * kl
    loss = (per_token * token_weights(m, loss_type, max_completion_length, num_items)).sum()
    with torch.no_grad():
        low = (ratio < 1.0 - clip_low) & (adv < 0)
        high = (ratio > 1.0 + clip_high) & (adv > 0)
        metrics = {
            "clip_fraction": _masked_mean((low | high).float(), m),
            "ratio_mean": _masked_mean(ratio, m),
        }
        if kl is not None:
            metrics["kl_mean"] = _masked_mean(kl, m)
    return loss, metrics


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
