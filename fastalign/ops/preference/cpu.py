"""The ``cpu`` backends of dpo_loss, simpo_loss and bradley_terry_loss (csrc/cpu/rl_ops.cpp)."""

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
