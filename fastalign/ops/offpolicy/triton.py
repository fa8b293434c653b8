"""The ``triton`` backends of rollout_is_weights and off_policy_mask (``fastalign.triton_kernels.rl_losses``)."""

from __future__ import annotations

from .. import dispatch


@dispatch.register("rollout_is_weights", "triton")
def rollout_is_weights_triton(old_logp, rollout_logp, mask, *, mode, low, high):
    from fastalign.triton_kernels import rl_losses

    return rl_losses.rollout_is_weights(old_logp, rollout_logp, mask, mode=mode, low=low, high=high)


@dispatch.register("off_policy_mask", "triton")
def off_policy_mask_triton(logp, sampling_logp, advantages, mask, *, threshold):
    from fastalign.triton_kernels import rl_losses

    return rl_losses.off_policy_mask(logp, sampling_logp, advantages, mask, threshold=threshold)
