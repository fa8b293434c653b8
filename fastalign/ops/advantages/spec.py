"""Spec: group-normalized (GRPO), leave-one-out (RLOO) and GAE advantages, masked whitening."""

from __future__ import annotations

import torch

from ..kinds import Kind

# gathered by fastalign.ops.reference
__all__ = ["group_advantages", "rloo_advantages", "gae", "whiten", "reinforce_pp_advantages"]


class AdvantageScale(Kind):
    """What group advantages are divided by."""

    group = 0  # the unbiased std within each group
    batch = 1  # the std over all rewards
    none = 2   # nothing (Dr. GRPO)


def _group_mean(r: torch.Tensor) -> torch.Tensor:
    # Shifted by the group's first reward so that a group of equal rewards has a mean equal to
    # that reward bit for bit, and its advantages are exactly 0.
    first = r[:, :1]
    return first + (r - first).mean(dim=1, keepdim=True)


def _unbiased_std(x: torch.Tensor, mean: torch.Tensor, dim=None) -> torch.Tensor:
    # torch.std with one sample is NaN; a single sample has no spread, so its std is 0 here.
    n = x.shape[dim] if dim is not None else x.numel()
    if n < 2:
        return torch.zeros_like(mean)
    var = ((x - mean) ** 2).sum(dim=dim, keepdim=dim is not None) / (n - 1)
    # sqrt has an infinite slope at 0, which made the gradient of an equal-reward group NaN; take
    # the std's gradient there as 0 (what the native backward does): d adv = (g - mean g) / eps.
    return torch.where(var > 0, var.clamp(min=torch.finfo(var.dtype).tiny).sqrt(), torch.zeros_like(var))


def group_advantages(rewards, group_size, *, scale="group", eps=1e-4):
    r = rewards.float().view(-1, group_size)
    mean = _group_mean(r)
    adv = r - mean
    scale = AdvantageScale(AdvantageScale.code(scale, "scale"))
    if scale == AdvantageScale.group:
        adv = adv / (_unbiased_std(r, mean, dim=1) + eps)
    elif scale == AdvantageScale.batch:
        flat = rewards.float().view(1, -1)
        adv = adv / (_unbiased_std(flat, _group_mean(flat), dim=1) + eps)
    return adv.reshape(rewards.shape)


def rloo_advantages(rewards, group_size):
    r = rewards.float().view(-1, group_size)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return (r - baseline).reshape(rewards.shape)


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """Reverse recursion over the unmasked positions of each row; masked positions get 0."""
    r, v, m = rewards.float(), values.float(), mask.bool()
    adv = torch.zeros_like(r)
    batch, length = r.shape
    for b in range(batch):
        next_value = torch.zeros((), dtype=r.dtype, device=r.device)
        running = torch.zeros((), dtype=r.dtype, device=r.device)
        for t in range(length - 1, -1, -1):
            if not m[b, t]:
                continue
            delta = r[b, t] + gamma * next_value - v[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
            next_value = v[b, t]
    returns = torch.where(m, adv + v, torch.zeros_like(adv))
    return adv, returns


def whiten(x, mask, *, shift_mean=True, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over the masked positions (unbiased var); 0 elsewhere."""
    m = mask.to(torch.float32)
    xf = x.float()
    n = m.sum()
    mean = (xf * m).sum() / n
    var = (((xf - mean) ** 2) * m).sum() / n
    if n > 1:
        var = var * n / (n - 1)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


# ------------------------------------------------------------------ REINFORCE++ (issue 12)
def reinforce_pp_token_rewards(rewards, mask, *, group_size=None, kl=None, kl_coef=0.0):
    """Per-token rewards: ``−kl_coef·kl`` on every valid token, plus the sequence reward (minus its
    group's mean with ``group_size``) at the row's last valid token; 0 at masked positions."""
    m = mask.to(torch.float32)
    r = rewards.float()
    if group_size is not None:
        r = r - r.view(-1, group_size).mean(1).repeat_interleave(group_size)
    token = torch.zeros_like(m) if kl is None or kl_coef == 0.0 else -kl_coef * kl.detach().float() * m
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m != 0, positions, torch.full_like(positions, -1)).max(1).values
    has = last >= 0
    token[has, last[has]] += r[has]
    return token * m


def reinforce_pp_advantages(rewards, mask, *, group_size=None, kl=None, kl_coef=0.0):
    """REINFORCE++: reward-to-go (γ = 1) of :func:`reinforce_pp_token_rewards`, whitened over the valid
    tokens of the batch (unbiased variance, :func:`whiten`); REINFORCE++-baseline with ``group_size``."""
    m = mask.to(torch.float32)
    token = reinforce_pp_token_rewards(rewards, mask, group_size=group_size, kl=kl, kl_coef=kl_coef)
    returns = token.flip(1).cumsum(1).flip(1) * m
    return whiten(returns, m)
