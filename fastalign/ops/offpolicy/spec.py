"""Spec: off-policy corrections of the policy loss (issue 12) — detached per-token weights and masks.

``rollout_is_weights`` corrects the sampler/trainer mismatch (TRL's vLLM importance sampling),
``off_policy_mask`` drops stale negative sequences (DeepSeek-V3.2), ``entropy_mask`` keeps the
high-entropy tokens ("80/20"). All three are inputs of the policy loss's ``token_weights``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..kinds import Kind

__all__ = ["rollout_is_weights", "off_policy_mask", "entropy_mask"]  # gathered by fastalign.ops.reference


class RolloutIsMode(Kind):
    """How ``ρ = exp(old_logp − rollout_logp)`` becomes a weight (TRL's ``vllm_importance_sampling_mode``)."""

    token_truncate = 0     # min(max(ρ_t, low), high)
    token_mask = 1         # ρ_t · 1[low ≤ ρ_t ≤ high]
    sequence_truncate = 2  # the same on ρ_i = exp(Σ_t m_t·log ρ_t), on every token of row i
    sequence_mask = 3


def rollout_is_weights(old_logp, rollout_logp, mask, *, mode, low=None, high=3.0):
    """``[B, T]`` float32, detached. Masked tokens (and NaN differences) contribute log-ratio 0, as TRL."""
    m = mask.to(torch.float32)
    d = torch.nan_to_num((old_logp.detach().float() - rollout_logp.detach().float()) * m, nan=0.0)
    if mode.startswith("sequence"):
        d = d.sum(-1, keepdim=True)
    rho = torch.exp(d)
    if mode.endswith("truncate"):
        rho = torch.clamp(rho, min=low, max=high)
    else:
        lo = -math.inf if low is None else low
        hi = math.inf if high is None else high
        rho = rho.masked_fill((rho < lo) | (rho > hi), 0.0)
    return rho.expand(m.shape).contiguous()


def off_policy_mask(logp, sampling_logp, advantages, mask, *, threshold):
    """``[B, 1]`` float32: 0 for a row with ``A < 0`` whose mean ``sampling_logp − sg(logp)`` exceeds ``threshold``."""
    m = mask.to(torch.float32)
    kl = torch.nan_to_num(sampling_logp.detach().float() - logp.detach().float(), nan=0.0)
    avg = (kl * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)
    adv = advantages.detach().float()[:, None]
    return ((adv >= 0) | (avg <= threshold)).to(torch.float32)


def entropy_threshold(entropy, mask, quantile, group=None):
    """The ``1 − quantile`` quantile of the valid tokens' entropies over every rank of ``group`` (None: no token)."""
    local = entropy.detach().float()[mask.bool()]
    if group is not None:
        world = dist.get_world_size(group)
        counts = [torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([local.numel()], device=local.device), group=group)
        longest = max(int(c.item()) for c in counts)
        padded = torch.full((longest,), -1.0, device=local.device)  # entropies are >= 0: -1 marks padding
        padded[:local.numel()] = local
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        local = torch.cat([p[:int(c.item())] for p, c in zip(parts, counts)])
    if local.numel() == 0:
        return None
    return torch.quantile(local, 1.0 - quantile)


def entropy_mask(entropy, mask, *, quantile, group=None):
    """``[B, T]`` bool: the valid tokens whose entropy is ≥ the ``1 − quantile`` quantile (TRL's rule)."""
    valid = mask.bool()
    threshold = entropy_threshold(entropy, mask, quantile, group)
    if threshold is None:
        return torch.zeros_like(valid)
    return (entropy.detach().float() * valid >= threshold) & valid
