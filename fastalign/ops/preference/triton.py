"""The ``triton`` backends of the preference ops (``fastalign.triton_kernels.rl_losses``).

Triton is imported on the first call, so ``import fastalign`` works without it.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import dispatch


def _kernels():
    from fastalign.triton_kernels import rl_losses

    return rl_losses


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


# ---------------------------------------------------------------- D²O, KTO, ORPO, CPO (issue 13)
class _D2oLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ps, rs, pn, rn, beta, alpha):
        losses, sample_rewards, negative_rewards = _kernels().d2o_forward(ps, rs, pn, rn, beta=beta, alpha=alpha)
        ctx.save_for_backward(sample_rewards, negative_rewards)
        ctx.options = (ps.shape[1], beta, alpha, ps.dtype, pn.dtype)
        ctx.mark_non_differentiable(sample_rewards, negative_rewards)
        return losses, sample_rewards, negative_rewards

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses, _g_samples, _g_negative):
        need_samples, need_negative = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if grad_losses is None or not (need_samples or need_negative):
            return (None,) * 6
        k, beta, alpha, samples_dtype, negative_dtype = ctx.options
        grad_samples, grad_negative = _kernels().d2o_backward(
            grad_losses, *ctx.saved_tensors, k=k, beta=beta, alpha=alpha, samples_dtype=samples_dtype,
            negative_dtype=negative_dtype, need_samples=need_samples, need_negative=need_negative)
        return grad_samples, None, grad_negative, None, None, None


@dispatch.register("d2o_loss", "triton")
def d2o_loss_triton(policy_sample_logps, ref_sample_logps, policy_negative_logps, ref_negative_logps, *, beta, alpha):
    return _D2oLoss.apply(policy_sample_logps, ref_sample_logps.detach(), policy_negative_logps,
                          ref_negative_logps.detach(), beta, alpha)


class _KtoLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy, ref, desirable, kl_ref, beta, wd, wu):
        losses, rewards = _kernels().kto_forward(policy, ref, desirable, kl_ref, beta=beta, desirable_weight=wd,
                                                 undesirable_weight=wu)
        ctx.save_for_backward(policy, ref, desirable, kl_ref)
        ctx.options = (beta, wd, wu)
        ctx.mark_non_differentiable(rewards)
        return losses, rewards

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses, _g_rewards):
        if grad_losses is None or not ctx.needs_input_grad[0]:
            return (None,) * 7
        beta, wd, wu = ctx.options
        grad_policy = _kernels().kto_backward(grad_losses, *ctx.saved_tensors, beta=beta, desirable_weight=wd,
                                              undesirable_weight=wu)
        return grad_policy, None, None, None, None, None, None


@dispatch.register("kto_loss", "triton")
def kto_loss_triton(policy_logps, ref_logps, desirable, kl_ref, *, beta, desirable_weight, undesirable_weight):
    return _KtoLoss.apply(policy_logps, ref_logps.detach(), desirable, kl_ref.detach(), beta, desirable_weight,
                          undesirable_weight)


class _OrpoLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chosen, rejected, beta):
        losses, log_odds = _kernels().orpo_forward(chosen, rejected, beta=beta)
        ctx.save_for_backward(chosen, rejected)
        ctx.beta = beta
        ctx.mark_non_differentiable(log_odds)
        return losses, log_odds

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses, _g_log_odds):
        need_chosen, need_rejected = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_losses is None or not (need_chosen or need_rejected):
            return None, None, None
        grad_chosen, grad_rejected = _kernels().orpo_backward(grad_losses, *ctx.saved_tensors, beta=ctx.beta,
                                                              need_chosen=need_chosen, need_rejected=need_rejected)
        return grad_chosen, grad_rejected, None


@dispatch.register("orpo_loss", "triton")
def orpo_loss_triton(chosen_avg_logps, rejected_avg_logps, *, beta):
    return _OrpoLoss.apply(chosen_avg_logps, rejected_avg_logps, beta)


@dispatch.register("cpo_loss", "triton")
def cpo_loss_triton(chosen_logps, rejected_logps, *, beta, label_smoothing):
    # CPO's per-pair formula is SimPO's with γ = 0 (on summed instead of averaged log-probs).
    return _SimpoLoss.apply(chosen_logps, rejected_logps, beta, 0.0, label_smoothing)
