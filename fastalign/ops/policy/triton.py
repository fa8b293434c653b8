"""The ``triton`` backend of policy_loss (``fastalign.triton_kernels.rl_losses``; triton loads on first call).

One pass over the tokens forward (loss and metrics from per-program partial sums, added by a
one-program kernel) and one pass backward (the normalizer is known from the forward, so every
token's gradient is local). Masks are constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .. import dispatch


def _kernels():
    from fastalign.triton_kernels import rl_losses

    return rl_losses


@dataclass(frozen=True)
class _PolicyOptions:
    beta: float
    kl_kind: str
    clip_low: float
    clip_high: float
    loss_type: str
    max_completion_length: int | None
    num_items: float | None  # a plain number; a tensor travels as an input of the Function


class _PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, ref_logp, num_items_t, opts):
        k = _kernels()
        load = k.as_loadable
        logp_c, old_c, adv_c, mask_c = load(logp), load(old_logp), load(advantages), load(mask)
        ref_c = load(ref_logp) if opts.beta > 0.0 else None
        stats, row_scale = k.policy_loss_forward(
            logp_c, old_c, adv_c, mask_c, ref_c, beta=opts.beta, kl_kind=opts.kl_kind, clip_low=opts.clip_low,
            clip_high=opts.clip_high, loss_type=opts.loss_type, max_completion_length=opts.max_completion_length,
            num_items=num_items_t if num_items_t is not None else opts.num_items)
        ctx.save_for_backward(stats, row_scale, logp_c, old_c, adv_c, mask_c, ref_c)
        ctx.opts = opts
        loss, clip_fraction, ratio_mean, kl_mean = stats[0], stats[1], stats[2], stats[3]
        ctx.mark_non_differentiable(clip_fraction, ratio_mean, kl_mean)
        return loss, clip_fraction, ratio_mean, kl_mean

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _clip, _ratio, _kl):
        need_logp, need_adv = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if grad_loss is None or not (need_logp or need_adv):
            return None, None, None, None, None, None, None
        stats, row_scale, logp_c, old_c, adv_c, mask_c, ref_c = ctx.saved_tensors
        o = ctx.opts
        grad_logp, grad_adv = _kernels().policy_loss_backward(
            grad_loss.float().contiguous(), stats, row_scale, logp_c, old_c, adv_c, mask_c, ref_c, beta=o.beta,
            kl_kind=o.kl_kind, clip_low=o.clip_low, clip_high=o.clip_high, loss_type=o.loss_type,
            need_logp_grad=need_logp, need_adv_grad=need_adv)
        return grad_logp, None, grad_adv, None, None, None, None


@dispatch.register("policy_loss", "triton")
def policy_loss_triton(logp, old_logp, advantages, mask, *, ref_logp, beta, kl_kind, clip_low, clip_high,
                       loss_type, max_completion_length, num_items):
    num_items_t = num_items if isinstance(num_items, torch.Tensor) else None
    opts = _PolicyOptions(
        beta=beta, kl_kind=kl_kind, clip_low=clip_low, clip_high=clip_low if clip_high is None else clip_high,
        loss_type=loss_type, max_completion_length=max_completion_length,
        num_items=None if num_items is None or num_items_t is not None else float(num_items))
    loss, clip_fraction, ratio_mean, kl_mean = _PolicyLoss.apply(
        logp, old_logp, advantages, mask, ref_logp if beta > 0.0 else None, num_items_t, opts)
    metrics = {"clip_fraction": clip_fraction, "ratio_mean": ratio_mean}
    if beta > 0.0:
        metrics["kl_mean"] = kl_mean
    return loss, metrics
