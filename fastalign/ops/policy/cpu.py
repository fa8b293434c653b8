"""The ``cpu`` backends of policy_loss and value_loss (csrc/cpu/rl_ops.cpp, per-token math in csrc/common/rl_math.h)."""

from __future__ import annotations

import torch

from .. import native
from ..kl.spec import KlKind
from ..native import f32 as _f32
from ..native import grad as _grad
from ..native import weights as _weights
from .spec import ImportanceLevel, PolicyObjective


def policy_tokens_native(logp, old_logp, advantages, mask, ref_logp, scale, *, beta, kl_kind, clip_low, clip_high,
                         need_adv_grad, row_log_ratio=None, token_weights=None, level="token", objective="clip",
                         delta=None, dual_clip=None, kl_bias_correction=False):
    """The token pass of :func:`fastalign.ops.policy.token_pass` in one vectorized C++ loop."""
    loss, sums, d_logp, d_adv, d_row = torch.ops.fastalign.policy_tokens(
        logp, old_logp, advantages, mask, ref_logp, scale, beta, KlKind.code(kl_kind, "kl_kind"), clip_low, clip_high,
        need_adv_grad, row_log_ratio, token_weights, ImportanceLevel.code(level, "importance_sampling_level"),
        PolicyObjective.code(objective, "objective"), float("inf") if delta is None else float(delta),
        0.0 if dual_clip is None else float(dual_clip), bool(kl_bias_correction))
    return loss, sums, d_logp, d_adv if need_adv_grad else None, d_row


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

    @fake("fastalign::policy_tokens")
    def _(logp, old_logp, adv, mask, ref_logp, scale, beta, kl_kind, clip_low, clip_high, adv_grad, row_log_ratio,
          token_weights, level, objective, delta, dual_clip, kl_bias_correction):
        rows = logp.shape[0]
        return (scalar(logp), logp.new_empty((rows, 4)), like(logp), (like(adv) if adv_grad else adv.new_empty(0)),
                logp.new_empty(rows))

    fake("fastalign::value_loss_fwd")(lambda values, old, ret, mask, clip: (scalar(values), values.new_empty(2)))
    fake("fastalign::value_loss_bwd")(lambda grad, values, old, ret, mask, clip: like(values))


if native.has_op("policy_tokens"):
    _register_fakes()
    native.register("policy_loss", policy_tokens_native)
    native.register("value_loss", value_loss_native)
