"""Clipped policy-gradient loss (PPO/GRPO family) and clipped value loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .. import dispatch
from .. import validation as v
from ..kl import KL_KINDS
from . import cpu, triton  # noqa: F401  (register the compiled and Triton backends)
from . import spec as ref
from .spec import PolicyLossType, policy_metrics, row_scale

__all__ = ["policy_loss", "value_loss"]  # fastalign.ops re-exports these

LOSS_TYPES = PolicyLossType.names()


def check_options(*, beta, kl_kind, clip_low, clip_high, loss_type, max_completion_length, num_items,
                  clip_low_name="clip_low", clip_high_name="clip_high") -> None:
    """The policy loss's hyperparameters, checked once for ops.policy_loss and the fused losses."""
    v.positive("beta", beta, allow_zero=True)
    v.choice("kl_kind", kl_kind, KL_KINDS)
    v.in_range(clip_low_name, clip_low, 0.0, 1.0, high_inclusive=False)
    if clip_high is not None:
        v.positive(clip_high_name, clip_high, allow_zero=True)
    v.choice("loss_type", loss_type, LOSS_TYPES)
    if max_completion_length is not None:
        v.integer("max_completion_length", max_completion_length, minimum=1)
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1:
                raise ValueError(f"num_items must be a scalar, got shape {tuple(num_items.shape)}")
        else:
            v.positive("num_items", num_items)


@dataclass(frozen=True)
class PolicyConfig:
    """The per-token hyperparameters every backend's token pass takes."""

    beta: float
    kl_kind: str
    clip_low: float
    clip_high: float


class _TokenPass(torch.autograd.Function):
    """One backend's token pass: the loss and its gradients at once; the backward only scales them."""

    @staticmethod
    def forward(ctx, logp, advantages, old_logp, mask, ref_logp, scale, tokens, config: PolicyConfig):
        need_adv = ctx.needs_input_grad[1]
        loss, sums, d_logp, d_adv = tokens(logp, old_logp, advantages, mask, ref_logp, scale, beta=config.beta,
                                           kl_kind=config.kl_kind, clip_low=config.clip_low,
                                           clip_high=config.clip_high, need_adv_grad=need_adv)
        ctx.save_for_backward(d_logp, d_adv if need_adv else None)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_sums):
        d_logp, d_adv = ctx.saved_tensors
        if grad_loss is not None and not bool(grad_loss == 1):
            d_logp = d_logp * grad_loss
            d_adv = None if d_adv is None else d_adv * grad_loss
        return d_logp, d_adv, None, None, None, None, None, None


def token_pass(logp, old_logp, advantages, mask, ref_logp, scale, config: PolicyConfig):
    """``(loss = Σ scale·mask·term, sums [4])`` by the backend of ``logp``'s device, differentiable in
    ``logp`` and ``advantages`` (see :func:`fastalign.ops.policy.spec.policy_tokens` for the contract).
    ``scale`` is ``[R]`` per row or ``[R, T]`` per token (:func:`row_scale` gives it for a loss type).
    """
    _, tokens = dispatch.select("policy_loss", logp.device)
    ref32 = None if config.beta <= 0.0 else ref_logp.detach().float().contiguous()
    return _TokenPass.apply(logp.float().contiguous(), advantages.float().contiguous(),
                            old_logp.detach().float().contiguous(), mask.to(torch.float32).contiguous(), ref32,
                            scale.detach().float().contiguous(), tokens, config)


def policy_loss(logp, old_logp, advantages, mask, *, ref_logp=None, beta=0.0, kl_kind="k3",
                clip_low=0.2, clip_high=None, loss_type="grpo", max_completion_length=None,
                num_items=None):
    """Clipped surrogate ``-min(r·A, clip(r, 1-clip_low, 1+clip_high)·A) + beta·KL``, aggregated.

    ``loss_type``: ``grpo`` (mean per sequence, then over sequences), ``bnpo`` (token mean over
    the local batch), ``dr_grpo`` (sum / (B · max_completion_length)), ``dapo`` (sum /
    ``num_items``, the global token count; the local count when None). Returns
    ``(loss, metrics)`` with TRL's names: ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
    ``clip_ratio/region_mean``, ``approx_kl`` (``0.5·mean((logp − old_logp)²)``) and, when
    ``beta > 0``, ``kl`` (masked means over the tokens).
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
    if beta > 0:
        if ref_logp is None:
            raise ValueError("ref_logp must be given when beta > 0, got None")
        v.float_tensor("ref_logp", ref_logp)
        v.same_shape("ref_logp", ref_logp, logp.shape, ref="logp")
        v.same_device("ref_logp", ref_logp, logp, "logp")
    check_options(beta=beta, kl_kind=kl_kind, clip_low=clip_low, clip_high=clip_high, loss_type=loss_type,
                  max_completion_length=max_completion_length, num_items=num_items)
    m = mask.to(torch.float32)
    counts = m.sum(1)
    scale = row_scale(counts, loss_type, max_completion_length, num_items, length=logp.shape[1])
    config = PolicyConfig(float(beta), kl_kind, float(clip_low), float(clip_low if clip_high is None else clip_high))
    loss, sums = token_pass(logp, old_logp, advantages, m, ref_logp, scale, config)
    return loss, policy_metrics(sums, counts.sum(), config.beta)


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


# Each backend registers its token pass as "policy_loss"; the aggregation above is shared.
dispatch.register("policy_loss", "torch")(ref.policy_tokens)
dispatch.register("value_loss", "torch")(ref.value_loss)
