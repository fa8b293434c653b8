"""The ``cpu`` backends of policy_loss and value_loss (csrc/cpu/rl_ops.cpp, per-token math in csrc/common/rl_math.h)."""

from __future__ import annotations

import torch

from .. import native
from ..kl.spec import KlKind
from ..native import f32 as _f32
from ..native import grad as _grad
from ..native import weights as _weights
from .spec import PolicyLossType


class _PolicyLoss(torch.autograd.Function):
    """One fused forward (per-token loss, aggregation, metric sums) and one fused backward."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, ref_logp, config):
        loss, metrics, row_scale = torch.ops.fastalign.policy_loss_fwd(logp, old_logp, advantages, mask, ref_logp,
                                                                       *config)
        ctx.save_for_backward(logp, old_logp, advantages, mask, ref_logp, row_scale)
        ctx.config = config[:4]  # beta, kl_kind, clip_low, clip_high
        ctx.mark_non_differentiable(metrics, row_scale)
        return loss, metrics, row_scale

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics, _grad_row_scale):
        logp, old_logp, advantages, mask, ref_logp, row_scale = ctx.saved_tensors
        adv_grad = bool(ctx.needs_input_grad[2])
        d_logp, d_adv = torch.ops.fastalign.policy_loss_bwd(_grad(grad_loss), logp, old_logp, advantages, mask,
                                                            ref_logp, row_scale, *ctx.config, adv_grad)
        return d_logp, None, d_adv if adv_grad else None, None, None, None


def policy_loss_native(logp, old_logp, advantages, mask, *, ref_logp, beta, kl_kind, clip_low, clip_high, loss_type,
                       max_completion_length, num_items):
    clip_high = clip_low if clip_high is None else clip_high
    max_len = logp.shape[-1] if max_completion_length is None else max_completion_length
    # dapo divides by max(num_items, 1) rounded to float32 like the reference; -1 = the local count.
    items = -1.0
    if loss_type == "dapo" and num_items is not None:
        items = max(float(torch.as_tensor(num_items, dtype=torch.float32)), 1.0)
    ref = _f32(ref_logp.detach()) if beta > 0.0 else None
    config = (beta, KlKind.code(kl_kind, "kl_kind"), clip_low, clip_high, PolicyLossType.code(loss_type, "loss_type"),
              max_len, items)
    loss, metrics, _ = _PolicyLoss.apply(_f32(logp), _f32(old_logp.detach()), _f32(advantages), _weights(mask), ref,
                                         config)
    out = {"clip_fraction": metrics[0], "ratio_mean": metrics[1]}
    if beta > 0.0:
        out["kl_mean"] = metrics[2]
    return loss, out


class _ValueLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, old_values, returns, mask, clip):
        loss, metrics = torch.ops.fastalign.value_loss_fwd(values, old_values, returns, mask, clip)
        ctx.save_for_backward(values, old_values, returns, mask)
        ctx.clip = clip
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        values, old_values, returns, mask = ctx.saved_tensors
        d_values = torch.ops.fastalign.value_loss_bwd(_grad(grad_loss), values, old_values, returns, mask, ctx.clip)
        return d_values, None, None, None, None


def value_loss_native(values, old_values, returns, mask, *, clip):
    loss, metrics = _ValueLoss.apply(_f32(values), _f32(old_values.detach()), _f32(returns.detach()),
                                     _weights(mask), clip)
    return loss, {"clip_fraction": metrics[0], "value_mean": metrics[1]}


def _register_fakes() -> None:
    fake = torch.library.register_fake
    like = torch.empty_like

    def scalar(x):
        return x.new_empty((), dtype=torch.float32)

    @fake("fastalign::policy_loss_fwd")
    def _(logp, old_logp, adv, mask, ref_logp, beta, kl_kind, clip_low, clip_high, loss_type, max_len, num_items):
        return scalar(logp), logp.new_empty(3), logp.new_empty(logp.shape[0])

    @fake("fastalign::policy_loss_bwd")
    def _(grad, logp, old_logp, adv, mask, ref_logp, row_scale, beta, kl_kind, clip_low, clip_high, adv_grad):
        return like(logp), (like(adv) if adv_grad else adv.new_empty(0))

    fake("fastalign::value_loss_fwd")(lambda values, old, ret, mask, clip: (scalar(values), values.new_empty(2)))
    fake("fastalign::value_loss_bwd")(lambda grad, values, old, ret, mask, clip: like(values))


if native.has_op("policy_loss_fwd"):
    _register_fakes()
    native.register("policy_loss", policy_loss_native)
    native.register("value_loss", value_loss_native)
