"""Advantage estimators: GRPO group normalization, RLOO, GAE, masked whitening and REINFORCE++."""

from __future__ import annotations

import torch

from .. import dispatch
from .. import validation as v
from . import cpu  # noqa: F401  (registers the compiled backends)
from . import spec as ref
from .spec import AdvantageScale

# fastalign.ops re-exports these
__all__ = ["group_advantages", "rloo_advantages", "gae", "whiten", "reinforce_pp_advantages"]

SCALES = AdvantageScale.names()


def _check_groups(rewards, group_size, minimum):
    v.float_tensor("rewards", rewards, dim=1)
    v.integer("group_size", group_size, minimum=minimum)
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_size must divide the number of rewards: got group_size={group_size} "
            f"for {rewards.numel()} rewards")


def group_advantages(rewards, group_size, *, scale="group", eps=1e-4):
    """GRPO advantages ``(r - group mean) / (std + eps)``; the G samples of a prompt contiguous.

    ``scale="group"``: unbiased std within each group; ``"batch"``: std over all rewards;
    ``"none"``: no division (Dr. GRPO). A group of equal rewards gets exactly 0; a one-sample
    group has std 0.
    """
    _check_groups(rewards, group_size, 1)
    v.choice("scale", scale, SCALES)
    v.positive("eps", eps, allow_zero=True)
    _, impl = dispatch.select("group_advantages", rewards.device)
    return impl(rewards, group_size, scale=scale, eps=float(eps))


def rloo_advantages(rewards, group_size):
    """RLOO: each reward minus the mean of the other ``group_size - 1`` rewards of its group."""
    _check_groups(rewards, group_size, 2)
    _, impl = dispatch.select("rloo_advantages", rewards.device)
    return impl(rewards, group_size)


def _check_bt(rewards, values, mask):
    v.float_tensor("rewards", rewards, dim=2)
    v.float_tensor("values", values, dim=2)
    v.same_shape("values", values, rewards.shape, ref="rewards")
    v.same_device("values", values, rewards, "rewards")
    v.mask_tensor("mask", mask, rewards.shape, rewards)


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """Generalized advantage estimation over ``[B, T]``; returns ``(advantages, returns)``.

    The recursion runs over the unmasked positions of each row only: masked positions get 0 in
    both outputs and do not break the chain. ``returns = advantages + values``.
    """
    _check_bt(rewards, values, mask)
    v.in_range("gamma", gamma, 0.0, 1.0)
    v.in_range("lam", lam, 0.0, 1.0)
    _, impl = dispatch.select("gae", rewards.device)
    return impl(rewards, values, mask, gamma=float(gamma), lam=float(lam))


def whiten(x, mask, *, shift_mean=True, eps=1e-8):
    """Whiten ``x`` with the mean and unbiased variance of its masked positions (0 elsewhere)."""
    v.float_tensor("x", x)
    v.mask_tensor("mask", mask, x.shape, x)
    v.positive("eps", eps, allow_zero=True)
    if v.check_values_enabled() and x.numel() and not bool((mask != 0).any()):
        raise ValueError("mask must select at least one position, got an all-zero mask")
    _, impl = dispatch.select("whiten", x.device)
    return impl(x, mask, shift_mean=bool(shift_mean), eps=float(eps))


def reinforce_pp_advantages(rewards, mask, *, group_size=None, kl=None, kl_coef=0.0):
    """REINFORCE++ advantages ``[B, T]`` (issue 12): the sequence reward at its last valid token, minus
    ``kl_coef·kl`` per token, summed to go (γ = 1) and whitened over the valid tokens of the batch
    with the unbiased variance. With ``group_size`` (the G samples of a prompt contiguous),
    REINFORCE++-baseline: ``r − group mean`` instead of ``r``. Zeros at masked positions.

    Built from dispatched ops: the reward-to-go is :func:`gae` with zero values and ``γ = λ = 1``,
    the whitening :func:`whiten`, so it runs on their native backends.
    """
    v.float_tensor("rewards", rewards, dim=1)
    v.mask_tensor("mask", mask, (rewards.shape[0],) + tuple(mask.shape[1:]), rewards)
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    if group_size is not None:
        _check_groups(rewards, group_size, 1)
    v.positive("kl_coef", kl_coef, allow_zero=True)
    if kl is not None:
        v.float_tensor("kl", kl)
        v.same_shape("kl", kl, mask.shape, ref="mask")
        v.same_device("kl", kl, rewards, "rewards")
    elif kl_coef:
        raise ValueError(f"kl must be given when kl_coef > 0 (got kl_coef={kl_coef}), got None")
    token = ref.reinforce_pp_token_rewards(rewards.detach(), mask, group_size=group_size, kl=kl, kl_coef=kl_coef)
    m = mask.to(torch.float32)
    returns, _ = gae(token, torch.zeros_like(token), m, gamma=1.0, lam=1.0)
    return whiten(returns, m)


dispatch.register("group_advantages", "torch")(ref.group_advantages)
dispatch.register("rloo_advantages", "torch")(ref.rloo_advantages)
dispatch.register("whiten", "torch")(ref.whiten)


@dispatch.register("gae", "torch")
def _gae_torch(rewards, values, mask, *, gamma, lam):
    # Vectorized over the batch, one step per time index; a masked step carries the running
    # advantage and the next value through unchanged.
    r, val, m = rewards.float(), values.float(), mask != 0
    adv = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    next_value = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        step = r[:, t] + gamma * next_value - val[:, t] + gamma * lam * running
        running = torch.where(m[:, t], step, running)
        next_value = torch.where(m[:, t], val[:, t], next_value)
        adv[:, t] = torch.where(m[:, t], running, torch.zeros_like(running))
    returns = torch.where(m, adv + val, torch.zeros_like(adv))
    return adv, returns
