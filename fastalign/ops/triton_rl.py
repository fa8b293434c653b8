"""Triton backend of the elementwise-plus-reduction ops: kl_penalty, policy_loss, dpo_loss,
simpo_loss and bradley_terry_loss.

Each op is one ``torch.autograd.Function`` over the kernels in ``fastalign.triton_kernels.rl_losses``
and is registered with :mod:`dispatch` as ``"triton"``. Importing this module never imports
triton: the kernels load on the first call, so ``import fastalign`` works without triton.

Gradients flow to the same inputs as in the reference, except that masks are constants.
``policy_loss`` is one pass over the tokens forward (loss and metrics from per-program partial
sums, added by a one-program kernel) and one pass backward (the normalizer is known from the
forward, so every token's gradient is local).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from . import dispatch


def _kernels():
    from fastalign.triton_kernels import rl_losses

    return rl_losses


# ----------------------------------------------------------------------------------- kl_penalty
class _KlPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref_logp, kind):
        k = _kernels()
        logp_c, ref_c = logp.contiguous(), ref_logp.contiguous()
        ctx.save_for_backward(logp_c, ref_c)
        ctx.kind = kind
        return k.kl_penalty_forward(logp_c, ref_c, kind)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        logp_c, ref_c = ctx.saved_tensors
        return _kernels().kl_penalty_backward(grad, logp_c, ref_c, ctx.kind), None, None


@dispatch.register("kl_penalty", "triton")
def kl_penalty_triton(logp, ref_logp, *, kind):
    return _KlPenalty.apply(logp, ref_logp, kind)


# ----------------------------------------------------------------------------------- policy_loss
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


# ----------------------------------------------------------------------------------- dpo / simpo
class _DpoLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pc, pr, rc, rr, beta, loss_type, label_smoothing):
        losses, chosen_rewards, rejected_rewards = _kernels().dpo_forward(
            pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        ctx.save_for_backward(pc, pr, rc, rr)
        ctx.options = (beta, loss_type, label_smoothing)
        ctx.mark_non_differentiable(chosen_rewards, rejected_rewards)
        return losses, chosen_rewards, rejected_rewards

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses, _grad_chosen_rewards, _grad_rejected_rewards):
        need_chosen, need_rejected = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_losses is None or not (need_chosen or need_rejected):
            return (None,) * 7
        beta, loss_type, label_smoothing = ctx.options
        grad_chosen, grad_rejected = _kernels().dpo_backward(
            grad_losses, *ctx.saved_tensors, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
            need_chosen=need_chosen, need_rejected=need_rejected)
        return grad_chosen, grad_rejected, None, None, None, None, None


@dispatch.register("dpo_loss", "triton")
def dpo_loss_triton(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
                    loss_type, label_smoothing):
    return _DpoLoss.apply(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                          beta, loss_type, label_smoothing)


class _SimpoLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chosen, rejected, beta, gamma, label_smoothing):
        out = _kernels().simpo_forward(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
        ctx.save_for_backward(chosen, rejected)
        ctx.options = (beta, gamma, label_smoothing)
        ctx.mark_non_differentiable(out[1], out[2])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses, _grad_chosen_rewards, _grad_rejected_rewards):
        need_chosen, need_rejected = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_losses is None or not (need_chosen or need_rejected):
            return (None,) * 5
        beta, gamma, label_smoothing = ctx.options
        grad_chosen, grad_rejected = _kernels().simpo_backward(
            grad_losses, *ctx.saved_tensors, beta=beta, gamma=gamma, label_smoothing=label_smoothing,
            need_chosen=need_chosen, need_rejected=need_rejected)
        return grad_chosen, grad_rejected, None, None, None


@dispatch.register("simpo_loss", "triton")
def simpo_loss_triton(chosen_logps, rejected_logps, *, beta, gamma, label_smoothing):
    return _SimpoLoss.apply(chosen_logps, rejected_logps, beta, gamma, label_smoothing)


# ----------------------------------------------------------------------------------- bradley_terry
class _BradleyTerryLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chosen, rejected, margin, margin_value, center_coef):
        stats = _kernels().bradley_terry_forward(chosen, rejected, margin, margin_value=margin_value,
                                                 center_coef=center_coef)
        ctx.save_for_backward(chosen, rejected, margin)
        ctx.options = (margin_value, center_coef)
        loss, accuracy, mean_margin = stats[0], stats[1], stats[2]
        ctx.mark_non_differentiable(accuracy, mean_margin)
        return loss, accuracy, mean_margin

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_accuracy, _grad_margin):
        need_chosen, need_rejected, need_margin = ctx.needs_input_grad[:3]
        if grad_loss is None or not (need_chosen or need_rejected or need_margin):
            return (None,) * 5
        chosen, rejected, margin = ctx.saved_tensors
        margin_value, center_coef = ctx.options
        grad_c, grad_r, grad_m = _kernels().bradley_terry_backward(
            grad_loss.float().contiguous(), chosen, rejected, margin, margin_value=margin_value,
            center_coef=center_coef, need_chosen=need_chosen, need_rejected=need_rejected, need_margin=need_margin)
        return grad_c, grad_r, grad_m, None, None


@dispatch.register("bradley_terry_loss", "triton")
def bradley_terry_loss_triton(chosen_rewards, rejected_rewards, *, margin, center_coef):
    margin_t = margin if isinstance(margin, torch.Tensor) else None
    margin_value = 0.0 if margin is None or margin_t is not None else float(margin)
    loss, accuracy, mean_margin = _BradleyTerryLoss.apply(chosen_rewards, rejected_rewards, margin_t, margin_value,
                                                          center_coef)
    return loss, {"accuracy": accuracy, "margin": mean_margin}
