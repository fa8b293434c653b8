"""Clipped policy-gradient loss (PPO/GRPO family) and clipped value loss."""

from __future__ import annotations

import torch

from .. import dispatch
from .. import validation as v
from ..kl import KL_KINDS
from . import cpu, triton  # noqa: F401  (register the compiled and Triton backends)
from . import spec as ref
from .spec import PolicyLossType

LOSS_TYPES = PolicyLossType.names()


def policy_loss(logp, old_logp, advantages, mask, *, ref_logp=None, beta=0.0, kl_kind="k3",
                clip_low=0.2, clip_high=None, loss_type="grpo", max_completion_length=None,
                num_items=None):
    """Clipped surrogate ``-min(r·A, clip(r, 1-clip_low, 1+clip_high)·A) + beta·KL``, aggregated.

    ``loss_type``: ``grpo`` (mean per sequence, then over sequences), ``bnpo`` (token mean over
    the local batch), ``dr_grpo`` (sum / (B · max_completion_length)), ``dapo`` (sum /
    ``num_items``, the global token count; the local count when None). Returns
    ``(loss, metrics)`` with ``clip_fraction``, ``ratio_mean`` and, when beta > 0, ``kl_mean``.
    """
    v.float_tensor("logp", logp, dim=2)
    v.float_tensor("old_logp", old_logp)
    v.same_shape("old_logp", old_logp, logp.shape, ref="logp")
    v.float_tensor("advantages", advantages)
    if advantages.dim() == 1:
        v.same_shape("advantages", advantages, logp.shape[:1], ref="[B]")
    else:
        v.same_shape("advantages", advantages, logp.shape, ref="logp, or [B]")
    v.mask_tensor("mask", mask, logp.shape, logp)
    for name, t in (("old_logp", old_logp), ("advantages", advantages)):
        v.same_device(name, t, logp, "logp")
    v.positive("beta", beta, allow_zero=True)
    v.choice("kl_kind", kl_kind, KL_KINDS)
    if beta > 0:
        if ref_logp is None:
            raise ValueError("ref_logp must be given when beta > 0, got None")
        v.float_tensor("ref_logp", ref_logp)
        v.same_shape("ref_logp", ref_logp, logp.shape, ref="logp")
        v.same_device("ref_logp", ref_logp, logp, "logp")
    v.in_range("clip_low", clip_low, 0.0, 1.0, high_inclusive=False)
    if clip_high is not None:
        v.positive("clip_high", clip_high, allow_zero=True)
    v.choice("loss_type", loss_type, LOSS_TYPES)
    if max_completion_length is not None:
        v.integer("max_completion_length", max_completion_length, minimum=1)
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1:
                raise ValueError(f"num_items must be a scalar, got shape {tuple(num_items.shape)}")
        else:
            v.positive("num_items", num_items)
    _, impl = dispatch.select("policy_loss", logp.device)
    return impl(logp, old_logp, advantages, mask, ref_logp=ref_logp, beta=float(beta), kl_kind=kl_kind,
                clip_low=float(clip_low), clip_high=None if clip_high is None else float(clip_high),
                loss_type=loss_type, max_completion_length=max_completion_length, num_items=num_items)


def value_loss(values, old_values, returns, mask, *, clip=0.2):
    """``0.5 · masked_mean(max((v - R)², (clip(v, v_old ± clip) - R)²))``; returns ``(loss, metrics)``."""
    v.float_tensor("values", values)
    for name, t in (("old_values", old_values), ("returns", returns)):
        v.float_tensor(name, t)
        v.same_shape(name, t, values.shape, ref="values")
        v.same_device(name, t, values, "values")
    v.mask_tensor("mask", mask, values.shape, values)
    v.positive("clip", clip)
    _, impl = dispatch.select("value_loss", values.device)
    return impl(values, old_values, returns, mask, clip=float(clip))


dispatch.register("policy_loss", "torch")(ref.policy_loss)
dispatch.register("value_loss", "torch")(ref.value_loss)
