"""The ``triton`` backend of policy_loss: its token pass (``fastalign.triton_kernels.rl_losses``).

One kernel over the tokens gives the scaled loss, the metric sums and d logp at once (the
aggregation is shared, see ``policy/__init__.py``). Triton is imported on the first call.
"""

from __future__ import annotations

from .. import dispatch


@dispatch.register("policy_loss", "triton")
def policy_tokens_triton(logp, old_logp, advantages, mask, ref_logp, scale, *, beta, kl_kind, clip_low, clip_high,
                         need_adv_grad, row_log_ratio=None, token_weights=None, level="token", objective="clip",
                         delta=None, dual_clip=None, kl_bias_correction=False):
    from fastalign.triton_kernels import rl_losses

    return rl_losses.policy_tokens(logp, old_logp, advantages, mask, ref_logp, scale, beta=beta, kl_kind=kl_kind,
                                   clip_low=clip_low, clip_high=clip_high, need_adv_grad=need_adv_grad,
                                   row_log_ratio=row_log_ratio, token_weights=token_weights, level=level,
                                   objective=objective, delta=delta, dual_clip=dual_clip,
                                   kl_bias_correction=kl_bias_correction)
