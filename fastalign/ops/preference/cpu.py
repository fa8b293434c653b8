"""The ``cpu`` backends of the preference ops: dpo, simpo, bradley_terry, d2o, kto, orpo, cpo (csrc/cpu/rl_ops.cpp)."""

from __future__ import annotations

import torch

from .. import native
from ..native import f32 as _f32
from ..native import grad as _grad
from .spec import DpoLossType


class _DpoLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pc, pr, rc, rr, beta, loss_type, label_smoothing):
        losses, chosen_rewards, rejected_rewards = torch.ops.fastalign.dpo_fwd(pc, pr, rc, rr, beta, loss_type,
                                                                               label_smoothing)
        ctx.save_for_backward(pc, pr, rc, rr)
        ctx.args = (beta, loss_type, label_smoothing)
        ctx.mark_non_differentiable(chosen_rewards, rejected_rewards)  # the reference detaches them
        return losses, chosen_rewards, rejected_rewards

    @staticmethod
    def backward(ctx, grad, _g_chosen, _g_rejected):
        if grad is None:
            return None, None, None, None, None, None, None
        d_chosen = torch.ops.fastalign.dpo_bwd(_grad(grad), *ctx.saved_tensors, *ctx.args)
        return d_chosen, -d_chosen, None, None, None, None, None


def dpo_loss_native(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
                    loss_type, label_smoothing):
    return _DpoLoss.apply(_f32(policy_chosen_logps), _f32(policy_rejected_logps), _f32(ref_chosen_logps.detach()),
                          _f32(ref_rejected_logps.detach()), beta, DpoLossType.code(loss_type, "loss_type"),
                          label_smoothing)


class _SimpoLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chosen, rejected, beta, gamma, label_smoothing):
        losses, chosen_rewards, rejected_rewards = torch.ops.fastalign.simpo_fwd(chosen, rejected, beta, gamma,
                                                                                 label_smoothing)
        ctx.save_for_backward(chosen, rejected)
        ctx.args = (beta, gamma, label_smoothing)
        ctx.mark_non_differentiable(chosen_rewards, rejected_rewards)
        return losses, chosen_rewards, rejected_rewards

    @staticmethod
    def backward(ctx, grad, _g_chosen, _g_rejected):
        if grad is None:
            return None, None, None, None, None
        d_chosen = torch.ops.fastalign.simpo_bwd(_grad(grad), *ctx.saved_tensors, *ctx.args)
        return d_chosen, -d_chosen, None, None, None


def simpo_loss_native(chosen_logps, rejected_logps, *, beta, gamma, label_smoothing):
    return _SimpoLoss.apply(_f32(chosen_logps), _f32(rejected_logps), beta, gamma, label_smoothing)


class _BradleyTerryLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chosen, rejected, margin, margin_scalar, center_coef):
        loss, metrics = torch.ops.fastalign.bradley_terry_fwd(chosen, rejected, margin, margin_scalar, center_coef)
        ctx.save_for_backward(chosen, rejected, margin)
        ctx.args = (margin_scalar, center_coef)
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        chosen, rejected, margin = ctx.saved_tensors
        d_chosen, d_rejected = torch.ops.fastalign.bradley_terry_bwd(_grad(grad_loss), chosen, rejected, margin,
                                                                     *ctx.args)
        # The margin enters as -(r_w - r_l - margin): its gradient is minus the log-sigmoid part of d_chosen.
        d_margin = (d_rejected - d_chosen) * 0.5 if ctx.needs_input_grad[2] else None
        return d_chosen, d_rejected, d_margin, None, None


def bradley_terry_loss_native(chosen_rewards, rejected_rewards, *, margin, center_coef):
    margin_tensor = _f32(margin) if isinstance(margin, torch.Tensor) else None
    margin_scalar = 0.0 if margin is None or margin_tensor is not None else float(margin)
    loss, metrics = _BradleyTerryLoss.apply(_f32(chosen_rewards), _f32(rejected_rewards), margin_tensor, margin_scalar,
                                            center_coef)
    return loss, {"accuracy": metrics[0], "margin": metrics[1]}


def _register_fakes() -> None:
    fake = torch.library.register_fake
    like = torch.empty_like
    fake("fastalign::dpo_fwd")(lambda pc, pr, rc, rr, beta, t, ls: (like(pc), like(pc), like(pc)))
    fake("fastalign::dpo_bwd")(lambda grad, pc, pr, rc, rr, beta, t, ls: like(pc))
    fake("fastalign::simpo_fwd")(lambda c, r, beta, gamma, ls: (like(c), like(c), like(c)))
    fake("fastalign::simpo_bwd")(lambda grad, c, r, beta, gamma, ls: like(c))
    fake("fastalign::bradley_terry_fwd")(lambda c, r, margin, ms, cc: (c.new_empty((), dtype=torch.float32),
                                                                      c.new_empty(2)))
    fake("fastalign::bradley_terry_bwd")(lambda grad, c, r, margin, ms, cc: (like(c), like(c)))


if native.has_op("dpo_fwd"):
    _register_fakes()
    native.register("dpo_loss", dpo_loss_native)
    native.register("simpo_loss", simpo_loss_native)
    native.register("bradley_terry_loss", bradley_terry_loss_native)


# ---------------------------------------------------------------- D²O, KTO, ORPO, CPO (issue 13)
class _D2oLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ps, rs, pn, rn, beta, alpha):
        losses, sample_rewards, negative_rewards = torch.ops.fastalign.d2o_fwd(ps, rs, pn, rn, beta, alpha)
        ctx.save_for_backward(sample_rewards, negative_rewards)
        ctx.args = (ps.shape[1], beta, alpha)
        ctx.mark_non_differentiable(sample_rewards, negative_rewards)
        return losses, sample_rewards, negative_rewards

    @staticmethod
    def backward(ctx, grad, _g_samples, _g_negative):
        if grad is None:
            return (None,) * 6
        d_samples, d_negative = torch.ops.fastalign.d2o_bwd(_grad(grad), *ctx.saved_tensors, *ctx.args)
        return d_samples, None, d_negative, None, None, None


def d2o_loss_native(policy_sample_logps, ref_sample_logps, policy_negative_logps, ref_negative_logps, *, beta, alpha):
    return _D2oLoss.apply(_f32(policy_sample_logps), _f32(ref_sample_logps.detach()), _f32(policy_negative_logps),
                          _f32(ref_negative_logps.detach()), beta, alpha)


class _KtoLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy, ref, desirable, kl_ref, beta, wd, wu):
        losses, rewards = torch.ops.fastalign.kto_fwd(policy, ref, desirable, kl_ref, beta, wd, wu)
        ctx.save_for_backward(policy, ref, desirable, kl_ref)
        ctx.args = (beta, wd, wu)
        ctx.mark_non_differentiable(rewards)
        return losses, rewards

    @staticmethod
    def backward(ctx, grad, _g_rewards):
        if grad is None:
            return (None,) * 7
        d_policy = torch.ops.fastalign.kto_bwd(_grad(grad), *ctx.saved_tensors, *ctx.args)
        return d_policy, None, None, None, None, None, None


def kto_loss_native(policy_logps, ref_logps, desirable, kl_ref, *, beta, desirable_weight, undesirable_weight):
    return _KtoLoss.apply(_f32(policy_logps), _f32(ref_logps.detach()), native.weights(desirable),
                          _f32(kl_ref.detach()), beta, desirable_weight, undesirable_weight)


class _OrpoLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chosen, rejected, beta):
        losses, log_odds = torch.ops.fastalign.orpo_fwd(chosen, rejected, beta)
        ctx.save_for_backward(chosen, rejected)
        ctx.beta = beta
        ctx.mark_non_differentiable(log_odds)
        return losses, log_odds

    @staticmethod
    def backward(ctx, grad, _g_log_odds):
        if grad is None:
            return None, None, None
        d_chosen, d_rejected = torch.ops.fastalign.orpo_bwd(_grad(grad), *ctx.saved_tensors, ctx.beta)
        return d_chosen, d_rejected, None


def orpo_loss_native(chosen_avg_logps, rejected_avg_logps, *, beta):
    return _OrpoLoss.apply(_f32(chosen_avg_logps), _f32(rejected_avg_logps), beta)


class _CpoLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chosen, rejected, beta, label_smoothing):
        losses = torch.ops.fastalign.cpo_fwd(chosen, rejected, beta, label_smoothing)
        ctx.save_for_backward(chosen, rejected)
        ctx.args = (beta, label_smoothing)
        return losses

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None
        d_chosen = torch.ops.fastalign.cpo_bwd(_grad(grad), *ctx.saved_tensors, *ctx.args)
        return d_chosen, -d_chosen, None, None


def cpo_loss_native(chosen_logps, rejected_logps, *, beta, label_smoothing):
    chosen, rejected = _f32(chosen_logps), _f32(rejected_logps)
    losses = _CpoLoss.apply(chosen, rejected, beta, label_smoothing)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def _register_variant_fakes() -> None:
    fake = torch.library.register_fake
    like = torch.empty_like
    fake("fastalign::d2o_fwd")(lambda ps, rs, pn, rn, beta, alpha: (like(pn), like(pn), like(pn)))
    fake("fastalign::d2o_bwd")(lambda g, sr, nr, k, beta, alpha: (g.new_empty((g.shape[0], k)), like(g)))
    fake("fastalign::kto_fwd")(lambda p, r, d, z, beta, wd, wu: (like(p), like(p)))
    fake("fastalign::kto_bwd")(lambda g, p, r, d, z, beta, wd, wu: like(p))
    fake("fastalign::orpo_fwd")(lambda c, r, beta: (like(c), like(c)))
    fake("fastalign::orpo_bwd")(lambda g, c, r, beta: (like(c), like(c)))
    fake("fastalign::cpo_fwd")(lambda c, r, beta, ls: like(c))
    fake("fastalign::cpo_bwd")(lambda g, c, r, beta, ls: like(c))


if native.has_op("d2o_fwd"):
    _register_variant_fakes()
    native.register("d2o_loss", d2o_loss_native)
    native.register("kto_loss", kto_loss_native)
    native.register("orpo_loss", orpo_loss_native)
    native.register("cpo_loss", cpo_loss_native)
