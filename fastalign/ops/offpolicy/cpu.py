"""The ``cpu`` backends of rollout_is_weights and off_policy_mask (csrc/cpu/rl_ops.cpp: one row loop each)."""

from __future__ import annotations

import torch

from .. import native
from ..native import f32 as _f32
from ..native import weights as _weights
from .spec import RolloutIsMode


def rollout_is_weights_native(old_logp, rollout_logp, mask, *, mode, low, high):
    return torch.ops.fastalign.rollout_is_weights(
        _f32(old_logp), _f32(rollout_logp), _weights(mask), RolloutIsMode.code(mode, "mode"),
        float("-inf") if low is None else low, float("inf") if high is None else high)


def off_policy_mask_native(logp, sampling_logp, advantages, mask, *, threshold):
    return torch.ops.fastalign.off_policy_mask(_f32(logp), _f32(sampling_logp), _f32(advantages), _weights(mask),
                                               threshold).unsqueeze(1)


if native.has_op("rollout_is_weights"):
    fake = torch.library.register_fake
    fake("fastalign::rollout_is_weights")(lambda old, rollout, mask, mode, low, high: torch.empty_like(old))
    fake("fastalign::off_policy_mask")(lambda logp, s, adv, mask, threshold: logp.new_empty(logp.shape[0]))
    native.register("rollout_is_weights", rollout_is_weights_native)
    native.register("off_policy_mask", off_policy_mask_native)
