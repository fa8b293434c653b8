"""Off-policy corrections for the policy loss: rollout importance weights, the off-policy sequence mask and the
top-entropy token mask (issue 12). Each returns a detached weight for ``policy_loss(token_weights=...)``."""

from __future__ import annotations

from .. import dispatch
from .. import validation as v
from . import cpu, triton  # noqa: F401  (register the compiled and Triton backends)
from . import spec as ref
from .spec import RolloutIsMode

__all__ = ["rollout_is_weights", "off_policy_mask", "entropy_mask"]  # fastalign.ops re-exports these

ROLLOUT_IS_MODES = RolloutIsMode.names()


def _number(name, value, *, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


def rollout_is_weights(old_logp, rollout_logp, mask, *, mode, low=None, high=3.0):
    """Sampler/trainer mismatch weights ``ρ = exp(old_logp − rollout_logp)``, ``[B, T]`` float32, detached.

    ``mode`` (TRL's ``vllm_importance_sampling_mode``): ``token_truncate`` ``clamp(ρ_t, low, high)``;
    ``token_mask`` ``ρ_t·1[low ≤ ρ_t ≤ high]``; ``sequence_truncate`` / ``sequence_mask`` the same on
    ``ρ_i = exp(Σ_t m_t·log ρ_t)`` (a product over the row), on every token of row i. ``low`` None =
    no lower bound. ``rollout_logp`` are the log-probs the sampler recorded.
    """
    v.float_tensor("old_logp", old_logp, dim=2)
    v.float_tensor("rollout_logp", rollout_logp)
    v.same_shape("rollout_logp", rollout_logp, old_logp.shape, ref="old_logp")
    v.same_device("rollout_logp", rollout_logp, old_logp, "old_logp")
    v.mask_tensor("mask", mask, old_logp.shape, old_logp)
    v.choice("mode", mode, ROLLOUT_IS_MODES)
    low, high = _number("low", low, allow_none=True), _number("high", high, allow_none=True)
    if low is not None and high is not None and not low <= high:
        raise ValueError(f"low must be <= high, got low={low}, high={high}")
    if mode.endswith("truncate") and high is None:
        raise ValueError(f"high must be a number for mode={mode!r} (the truncation cap), got None")
    _, impl = dispatch.select("rollout_is_weights", old_logp.device)
    return impl(old_logp.detach(), rollout_logp.detach(), mask, mode=mode, low=low, high=high)


def off_policy_mask(logp, sampling_logp, advantages, mask, *, threshold):
    """DeepSeek-V3.2's off-policy sequence mask, ``[B, 1]`` float32: 0 drops row i, which happens when
    ``A_i < 0`` and the mean over its valid tokens of ``sampling_logp − sg(logp)`` exceeds ``threshold``."""
    v.float_tensor("logp", logp, dim=2)
    v.float_tensor("sampling_logp", sampling_logp)
    v.same_shape("sampling_logp", sampling_logp, logp.shape, ref="logp")
    v.float_tensor("advantages", advantages)
    v.same_shape("advantages", advantages, logp.shape[:1], ref="[B], one per sequence")
    for name, t in (("sampling_logp", sampling_logp), ("advantages", advantages)):
        v.same_device(name, t, logp, "logp")
    v.mask_tensor("mask", mask, logp.shape, logp)
    threshold = _number("threshold", threshold)
    _, impl = dispatch.select("off_policy_mask", logp.device)
    return impl(logp.detach(), sampling_logp.detach(), advantages.detach(), mask, threshold=threshold)


def entropy_mask(entropy, mask, *, quantile, group=None):
    """``[B, T]`` bool: the valid tokens whose entropy is ≥ ``torch.quantile(valid entropies, 1 − quantile)``.

    ``quantile`` in (0, 1] is the fraction of valid tokens kept (TRL's ``top_entropy_quantile``); the
    quantile is taken over the valid tokens of every rank of ``group`` (a process group) when given.
    The work is one selection over the gathered entropies (torch.quantile) and a compare: there is
    nothing to fuse, so the spec is the one backend.
    """
    v.float_tensor("entropy", entropy, dim=2)
    v.mask_tensor("mask", mask, entropy.shape, entropy)
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be a number in (0, 1] (the fraction of valid tokens kept), got {quantile!r}")
    return ref.entropy_mask(entropy, mask, quantile=float(quantile), group=group)


dispatch.register("rollout_is_weights", "torch")(ref.rollout_is_weights)
dispatch.register("off_policy_mask", "torch")(ref.off_policy_mask)
