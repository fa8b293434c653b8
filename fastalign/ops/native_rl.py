"""Native backends of the RL and preference ops: autograd wrappers over ``torch.ops.fastalign``.

Covers kl_penalty, group_advantages, rloo_advantages, gae, whiten, sequence_logprobs,
policy_loss, value_loss, dpo_loss, simpo_loss and bradley_terry_loss. Each op is a pair of custom
ops (``*_fwd`` / ``*_bwd``, or the forward under the op's own name) registered by
``csrc/bindings.cpp`` for CPU and, for the scans and segmented reductions, by
``csrc/cuda_bindings.cpp`` for CUDA. The backward kernels are analytic: nothing is recomputed
through the reference.

The kernels take float32: these are ``[B, T]`` or ``[B]`` tensors (never ``N × V``), so inputs in
bf16/fp16 are upcast here with a differentiable ``.float()`` and autograd casts the gradients
back. Masks become float32 weights, exactly as the references use them.
"""

from __future__ import annotations

import torch

from . import dispatch

SCALE_CODES = {"group": 0, "batch": 1, "none": 2}
KL_CODES = {"k1": 0, "k2": 1, "k3": 2, "abs": 3}
LOSS_TYPE_CODES = {"grpo": 0, "bnpo": 1, "dr_grpo": 2, "dapo": 3}
DPO_CODES = {"sigmoid": 0, "hinge": 1, "ipo": 2, "robust": 3}

# Ops with CUDA kernels (csrc/cuda): the scans and segmented reductions. The elementwise ones run
# on CUDA through the Triton backend instead.
CUDA_OPS = ("group_advantages", "rloo_advantages", "gae", "sequence_logprobs")


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.float().contiguous()


def _weights(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.float32).contiguous()


def _grad(g: torch.Tensor | None) -> torch.Tensor | None:
    return None if g is None else g.float().contiguous()


def _register_fakes() -> None:
    fake = torch.library.register_fake

    def like(x):
        return torch.empty_like(x)

    def scalar(x):
        return x.new_empty((), dtype=torch.float32)

    fake("fastalign::group_advantages")(lambda rewards, group_size, scale, eps: like(rewards))
    fake("fastalign::group_advantages_bwd")(lambda grad, rewards, group_size, scale, eps: like(rewards))
    fake("fastalign::rloo_advantages")(lambda rewards, group_size: like(rewards))
    fake("fastalign::rloo_advantages_bwd")(lambda grad, group_size: like(grad))
    fake("fastalign::gae")(lambda rewards, values, mask, gamma, lam: (like(rewards), like(rewards)))
    fake("fastalign::gae_bwd")(lambda grad_adv, grad_ret, mask, gamma, lam: (like(mask), like(mask)))
    fake("fastalign::whiten_fwd")(lambda x, mask, shift_mean, eps: (like(x), x.new_empty(4)))
    fake("fastalign::whiten_bwd")(lambda grad, x, mask, stats, shift_mean: like(x))
    fake("fastalign::kl_fwd")(lambda logp, ref_logp, kind: like(logp))
    fake("fastalign::kl_bwd")(lambda grad, logp, ref_logp, kind: like(logp))
    fake("fastalign::sequence_logprobs_fwd")(lambda logp, mask, average: logp.new_empty(logp.shape[0]))
    fake("fastalign::sequence_logprobs_bwd")(lambda grad, mask, average: like(mask))

    @fake("fastalign::policy_loss_fwd")
    def _(logp, old_logp, adv, mask, ref_logp, beta, kl_kind, clip_low, clip_high, loss_type, max_len, num_items):
        return scalar(logp), logp.new_empty(3), logp.new_empty(logp.shape[0])

    @fake("fastalign::policy_loss_bwd")
    def _(grad, logp, old_logp, adv, mask, ref_logp, row_scale, beta, kl_kind, clip_low, clip_high, adv_grad):
        return like(logp), (like(adv) if adv_grad else adv.new_empty(0))

    fake("fastalign::value_loss_fwd")(lambda values, old, ret, mask, clip: (scalar(values), values.new_empty(2)))
    fake("fastalign::value_loss_bwd")(lambda grad, values, old, ret, mask, clip: like(values))
    fake("fastalign::dpo_fwd")(lambda pc, pr, rc, rr, beta, t, ls: (like(pc), like(pc), like(pc)))
    fake("fastalign::dpo_bwd")(lambda grad, pc, pr, rc, rr, beta, t, ls: like(pc))
    fake("fastalign::simpo_fwd")(lambda c, r, beta, gamma, ls: (like(c), like(c), like(c)))
    fake("fastalign::simpo_bwd")(lambda grad, c, r, beta, gamma, ls: like(c))
    fake("fastalign::bradley_terry_fwd")(lambda c, r, margin, ms, cc: (scalar(c), c.new_empty(2)))
    fake("fastalign::bradley_terry_bwd")(lambda grad, c, r, margin, ms, cc: (like(c), like(c)))


# ----------------------------------------------------------------------------------------- KL
class _KlPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref_logp, kind):
        ctx.save_for_backward(logp, ref_logp)
        ctx.kind = kind
        return torch.ops.fastalign.kl_fwd(logp, ref_logp, kind)

    @staticmethod
    def backward(ctx, grad):
        logp, ref_logp = ctx.saved_tensors
        return torch.ops.fastalign.kl_bwd(_grad(grad), logp, ref_logp, ctx.kind), None, None


def kl_penalty_native(logp, ref_logp, *, kind):
    return _KlPenalty.apply(_f32(logp), _f32(ref_logp.detach()), KL_CODES[kind])


# ----------------------------------------------------------------------------------------- advantages
class _GroupAdvantages(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rewards, group_size, scale, eps):
        ctx.save_for_backward(rewards)
        ctx.args = (group_size, scale, eps)
        return torch.ops.fastalign.group_advantages(rewards, group_size, scale, eps)

    @staticmethod
    def backward(ctx, grad):
        (rewards,) = ctx.saved_tensors
        return torch.ops.fastalign.group_advantages_bwd(_grad(grad), rewards, *ctx.args), None, None, None


def group_advantages_native(rewards, group_size, *, scale, eps):
    return _GroupAdvantages.apply(_f32(rewards), group_size, SCALE_CODES[scale], eps)


class _RlooAdvantages(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rewards, group_size):
        ctx.group_size = group_size
        return torch.ops.fastalign.rloo_advantages(rewards, group_size)

    @staticmethod
    def backward(ctx, grad):
        return torch.ops.fastalign.rloo_advantages_bwd(_grad(grad), ctx.group_size), None


def rloo_advantages_native(rewards, group_size):
    return _RlooAdvantages.apply(_f32(rewards), group_size)


class _Gae(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rewards, values, mask, gamma, lam):
        ctx.save_for_backward(mask)  # the backward scan needs only the mask
        ctx.args = (gamma, lam)
        return torch.ops.fastalign.gae(rewards, values, mask, gamma, lam)

    @staticmethod
    def backward(ctx, grad_adv, grad_ret):
        (mask,) = ctx.saved_tensors
        d_rewards, d_values = torch.ops.fastalign.gae_bwd(_grad(grad_adv), _grad(grad_ret), mask, *ctx.args)
        return d_rewards, d_values, None, None, None


def gae_native(rewards, values, mask, *, gamma, lam):
    return _Gae.apply(_f32(rewards), _f32(values), _weights(mask), gamma, lam)


class _Whiten(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, shift_mean, eps):
        out, stats = torch.ops.fastalign.whiten_fwd(x, mask, shift_mean, eps)
        ctx.save_for_backward(x, mask, stats)
        ctx.shift_mean = shift_mean
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mask, stats = ctx.saved_tensors
        return torch.ops.fastalign.whiten_bwd(_grad(grad), x, mask, stats, ctx.shift_mean), None, None, None


def whiten_native(x, mask, *, shift_mean, eps):
    return _Whiten.apply(_f32(x), _weights(mask), shift_mean, eps)


# ----------------------------------------------------------------------------------------- sequence sums
class _SequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token_logp, mask, average):
        ctx.save_for_backward(mask)
        ctx.average = average
        return torch.ops.fastalign.sequence_logprobs_fwd(token_logp, mask, average)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return torch.ops.fastalign.sequence_logprobs_bwd(_grad(grad), mask, ctx.average), None, None


def sequence_logprobs_native(token_logp, mask, *, average):
    return _SequenceLogprobs.apply(_f32(token_logp), _weights(mask), average)


# ----------------------------------------------------------------------------------------- policy / value
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
    config = (beta, KL_CODES[kl_kind], clip_low, clip_high, LOSS_TYPE_CODES[loss_type], max_len, items)
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


# ----------------------------------------------------------------------------------------- preference
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
                          _f32(ref_rejected_logps.detach()), beta, DPO_CODES[loss_type], label_smoothing)


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


_IMPLEMENTATIONS = {
    "kl_penalty": kl_penalty_native,
    "group_advantages": group_advantages_native,
    "rloo_advantages": rloo_advantages_native,
    "gae": gae_native,
    "whiten": whiten_native,
    "sequence_logprobs": sequence_logprobs_native,
    "policy_loss": policy_loss_native,
    "value_loss": value_loss_native,
    "dpo_loss": dpo_loss_native,
    "simpo_loss": simpo_loss_native,
    "bradley_terry_loss": bradley_terry_loss_native,
}


def _register() -> None:
    ok, cuda_built, _ = dispatch._native_status()
    if not ok or not hasattr(torch.ops.fastalign, "policy_loss_fwd"):  # not built, or built before these ops
        return
    _register_fakes()
    for op, impl in _IMPLEMENTATIONS.items():
        dispatch.register(op, "cpu")(impl)
        if cuda_built and op in CUDA_OPS:
            dispatch.register(op, "cuda")(impl)


_register()
