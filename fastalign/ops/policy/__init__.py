"""Clipped policy-gradient loss (PPO/GRPO family) and clipped value loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .. import dispatch
from .. import validation as v
from ..kl import KL_KINDS
from . import cpu, triton  # noqa: F401  (register the compiled and Triton backends)
from . import spec as ref
from .spec import (
    ImportanceLevel,
    PolicyLossType,
    clip_metrics,
    objective_of,
    policy_metrics,
    row_clip_metrics,
    row_scale,
    sequence_log_ratio,
)

__all__ = ["policy_loss", "value_loss"]  # fastalign.ops re-exports these

LOSS_TYPES = PolicyLossType.names()
IMPORTANCE_LEVELS = ImportanceLevel.names()


def check_options(*, beta, kl_kind, clip_low, clip_high, loss_type, max_completion_length, num_items,
                  clip_low_name="clip_low", clip_high_name="clip_high", importance_sampling_level="token",
                  delta=None, ratio_clip_c=None, kl_bias_correction=False) -> None:
    """The policy loss's hyperparameters, checked once for ops.policy_loss and the fused losses."""
    v.choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_LEVELS)
    if not isinstance(kl_bias_correction, bool):
        raise ValueError(f"kl_bias_correction must be a bool, got {kl_bias_correction!r}")
    if loss_type == "cispo":
        if clip_high is None:
            raise ValueError(f"{clip_high_name} must be given for loss_type='cispo': it is the absolute cap on the "
                             "importance weight (e.g. 5.0), got None")
        if delta is not None or ratio_clip_c is not None:
            raise ValueError("delta and ratio_clip_c apply to the clipped objective, not to loss_type='cispo'; got "
                             f"delta={delta!r}, ratio_clip_c={ratio_clip_c!r}")
    high = clip_low if clip_high is None else clip_high
    if delta is not None and (not isinstance(delta, (int, float)) or not delta > 1.0 + high):
        raise ValueError(f"delta must be a number > 1 + {clip_high_name} = {1.0 + high} (the two-sided clip caps "
                         f"the unclipped ratio above the clip range), got {delta!r}")
    if ratio_clip_c is not None and (not isinstance(ratio_clip_c, (int, float)) or not ratio_clip_c > 1.0):
        raise ValueError(f"ratio_clip_c must be a number > 1 (the dual clip bound for A < 0, e.g. 3), "
                         f"got {ratio_clip_c!r}")
    v.positive("beta", beta, allow_zero=True)
    v.choice("kl_kind", kl_kind, KL_KINDS)
    v.in_range(clip_low_name, clip_low, 0.0, 1.0, high_inclusive=False)
    if clip_high is not None:
        v.positive(clip_high_name, clip_high, allow_zero=True)
    v.choice("loss_type", loss_type, LOSS_TYPES)
    if max_completion_length is not None:
        v.integer("max_completion_length", max_completion_length, minimum=1)
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1:
                raise ValueError(f"num_items must be a scalar, got shape {tuple(num_items.shape)}")
        else:
            v.positive("num_items", num_items)


@dataclass(frozen=True)
class PolicyConfig:
    """The per-token hyperparameters every backend's token pass takes."""

    beta: float
    kl_kind: str
    clip_low: float
    clip_high: float  # for cispo: the absolute cap on the weight
    level: str = "token"  # ImportanceLevel
    objective: str = "clip"  # PolicyObjective
    delta: float | None = None
    dual_clip: float | None = None
    kl_bias_correction: bool = False

    def options(self) -> dict:
        """The keyword arguments of every backend's token pass."""
        return dict(beta=self.beta, kl_kind=self.kl_kind, clip_low=self.clip_low, clip_high=self.clip_high,
                    level=self.level, objective=self.objective, delta=self.delta, dual_clip=self.dual_clip,
                    kl_bias_correction=self.kl_bias_correction)


class _TokenPass(torch.autograd.Function):
    """One backend's token pass: the loss and its gradients at once; the backward only scales them.

    ``row_log_ratio [R]`` (GSPO's per-row mean log-ratio, computed by the caller from ``logp``) is an
    input like the others: at ``level="sequence"`` the pass returns ∂loss/∂row_log_ratio and autograd
    carries it back through the row mean into ``logp``, so the kernels stay elementwise.
    """

    @staticmethod
    def forward(ctx, logp, advantages, row_log_ratio, old_logp, mask, ref_logp, scale, token_weights, tokens,
                config: PolicyConfig):
        need_adv = ctx.needs_input_grad[1]
        loss, sums, d_logp, d_adv, d_row = tokens(
            logp, old_logp, advantages, mask, ref_logp, scale, need_adv_grad=need_adv,
            row_log_ratio=None if row_log_ratio is None else row_log_ratio.detach(), token_weights=token_weights,
            **config.options())
        ctx.save_for_backward(d_logp, d_adv if need_adv else None, d_row if config.level == "sequence" else None)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_sums):
        d_logp, d_adv, d_row = ctx.saved_tensors
        if grad_loss is not None and not bool(grad_loss == 1):
            d_logp, d_adv, d_row = (None if g is None else g * grad_loss for g in (d_logp, d_adv, d_row))
        return d_logp, d_adv, d_row, None, None, None, None, None, None, None


def token_pass(logp, old_logp, advantages, mask, ref_logp, scale, config: PolicyConfig, *, token_weights=None,
               row_log_ratio=None):
    """``(loss = Σ scale·mask·term, row_sums [R, 4])`` by the backend of ``logp``'s device, differentiable in
    ``logp`` and ``advantages`` (see :func:`fastalign.ops.policy.spec.policy_tokens` for the contract).
    ``scale`` is ``[R]`` per row or ``[R, T]`` per token (:func:`row_scale` gives it for a loss type).
    Unless ``config.level`` is ``token`` the rows must be whole sequences: ``row_log_ratio`` defaults
    to :func:`sequence_log_ratio` of ``logp`` (differentiable, so GSPO's gradient reaches every token).
    """
    _, tokens = dispatch.select("policy_loss", logp.device)
    ref32 = None if config.beta <= 0.0 else ref_logp.detach().float().contiguous()
    m = mask.to(torch.float32).contiguous()
    if config.level != "token" and row_log_ratio is None:
        row_log_ratio = sequence_log_ratio(logp, old_logp, m)
    if config.level == "token":
        row_log_ratio = None
    tw = None if token_weights is None else token_weights.detach().float().contiguous()
    return _TokenPass.apply(logp.float().contiguous(), advantages.float().contiguous(),
                            None if row_log_ratio is None else row_log_ratio.float().contiguous(),
                            old_logp.detach().float().contiguous(), m, ref32, scale.detach().float().contiguous(),
                            tw, tokens, config)


def policy_loss(logp, old_logp, advantages, mask, *, ref_logp=None, beta=0.0, kl_kind="k3",
                clip_low=0.2, clip_high=None, loss_type="grpo", max_completion_length=None,
                num_items=None, importance_sampling_level="token", delta=None, ratio_clip_c=None,
                kl_bias_correction=False, token_weights=None):
    """Clipped surrogate ``-min(r·A, clip(r, 1-clip_low, 1+clip_high)·A) + beta·KL``, aggregated.

    ``loss_type``: ``grpo`` (mean per sequence, then over sequences), ``bnpo`` (token mean over
    the local batch), ``dr_grpo`` (sum / (B · max_completion_length)), ``dapo`` (sum /
    ``num_items``, the global token count; the local count when None), ``cispo``
    (``−sg(min(r, clip_high))·A·logp``, ``clip_high`` an absolute cap such as 5, aggregated like dapo).

    This year's options, as TRL 1.16's ``GRPOTrainer``: ``importance_sampling_level`` ``token``,
    ``sequence`` (GSPO: ``r = exp(row-mean log-ratio)``) or ``sequence_token`` (GSPO-token);
    ``delta`` caps the unclipped ratio (two-sided clip, > 1 + clip_high); ``ratio_clip_c`` bounds the
    loss of a token with ``A < 0`` by ``−c·A`` (dual clip, > 1); ``kl_bias_correction`` multiplies
    the KL term by ``r`` (TRL's ``use_bias_correction_kl``); ``token_weights [B, T]`` (detached, e.g.
    :func:`fastalign.ops.entropy_mask`, :func:`fastalign.ops.rollout_is_weights`) multiply the
    surrogate after clipping, before the KL term.

    Returns ``(loss, metrics)`` with TRL's names: ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
    ``clip_ratio/region_mean``, ``clip_ratio/low_min``, ``clip_ratio/high_max`` (``cispo_clip_ratio``
    for cispo), ``approx_kl`` (``0.5·mean((logp − old_logp)²)``) and, when ``beta > 0``, ``kl``.
    """
    v.float_tensor("logp", logp, dim=2)
    v.float_tensor("old_logp", old_logp)
    v.same_shape("old_logp", old_logp, logp.shape, ref="logp")
    v.float_tensor("advantages", advantages)
    if advantages.dim() == 1:
        v.same_shape("advantages", advantages, logp.shape[:1], ref="[B]")
    else:
        v.same_shape("advantages", advantages, logp.shape, ref="logp, or [B]")
    v.mask_tensor("mask", mask, logp.shape, logp)
    for name, t in (("old_logp", old_logp), ("advantages", advantages)):
        v.same_device(name, t, logp, "logp")
    if beta > 0:
        if ref_logp is None:
            raise ValueError("ref_logp must be given when beta > 0, got None")
        v.float_tensor("ref_logp", ref_logp)
        v.same_shape("ref_logp", ref_logp, logp.shape, ref="logp")
        v.same_device("ref_logp", ref_logp, logp, "logp")
    if token_weights is not None:
        v.float_tensor("token_weights", token_weights)
        v.same_shape("token_weights", token_weights, logp.shape, ref="logp")
        v.same_device("token_weights", token_weights, logp, "logp")
    check_options(beta=beta, kl_kind=kl_kind, clip_low=clip_low, clip_high=clip_high, loss_type=loss_type,
                  max_completion_length=max_completion_length, num_items=num_items,
                  importance_sampling_level=importance_sampling_level, delta=delta, ratio_clip_c=ratio_clip_c,
                  kl_bias_correction=kl_bias_correction)
    m = mask.to(torch.float32)
    counts = m.sum(1)
    scale = row_scale(counts, loss_type, max_completion_length, num_items, length=logp.shape[1])
    config = PolicyConfig(float(beta), kl_kind, float(clip_low), float(clip_low if clip_high is None else clip_high),
                          importance_sampling_level, objective_of(loss_type), None if delta is None else float(delta),
                          None if ratio_clip_c is None else float(ratio_clip_c), kl_bias_correction)
    loss, row_sums = token_pass(logp, old_logp, advantages, m, ref_logp, scale, config, token_weights=token_weights)
    with torch.no_grad():
        return loss, row_metrics(row_sums, counts, advantages, config)


def row_metrics(row_sums, counts, advantages, config: PolicyConfig):
    """Every metric of a token pass over whole sequences from its ``row_sums [R, 4]`` and ``counts [R]``
    (no ``[B, T]`` pass: TRL's per-sequence clip extremes come from the per-row indicator counts)."""
    metrics = {k: x for k, x in policy_metrics(row_sums.sum(0), counts.sum(), config.beta).items()
               if not k.startswith("clip_ratio/")}
    per_row = config.level == "sequence" and advantages.dim() == 1
    empty_high = None
    if per_row and config.objective == "cispo":  # an empty row's weight is exp(0) = 1
        empty_high = (advantages.detach() > 0) & (1.0 > config.clip_high)
    metrics.update(row_clip_metrics(row_sums[:, 0], row_sums[:, 1], counts, per_row=per_row,
                                    objective=config.objective, empty_high=empty_high))
    return metrics


def full_metrics(sums, count, logp, old_logp, advantages, mask, config: PolicyConfig):
    """The kernel's summed ``sums [4]`` (``approx_kl``, ``kl``) plus the clip metrics TRL logs, recomputed
    from full ``[B, T]`` rows: for token passes whose rows are not sequences (the chunk loop's flat chunks)."""
    metrics = {k: x for k, x in policy_metrics(sums, count, config.beta).items() if not k.startswith("clip_ratio/")}
    metrics.update(clip_indicator_metrics(logp, old_logp, advantages, mask, config))
    return metrics


@torch.no_grad()
def clip_indicator_metrics(logp, old_logp, advantages, mask, config: PolicyConfig):
    """TRL's ``clip_ratio/*`` (with ``low_min``/``high_max``) or ``cispo_clip_ratio`` from full ``[B, T]`` rows."""
    lr = logp.detach().float() - old_logp.detach().float()
    if config.level != "token":
        lr = sequence_log_ratio(logp.detach(), old_logp, mask)[:, None].expand_as(lr)
    ratio = torch.exp(lr)
    adv = advantages.detach().float()
    adv = adv[:, None] if adv.dim() == 1 else adv
    if config.objective == "cispo":
        low, high = torch.zeros_like(ratio, dtype=torch.bool), (ratio > config.clip_high) & (adv > 0)
    else:
        unclipped = ratio if config.delta is None else ratio.clamp(max=config.delta)
        low = (unclipped < 1.0 - config.clip_low) & (adv < 0)
        high = (unclipped > 1.0 + config.clip_high) & (adv > 0)
    return clip_metrics(low.expand_as(ratio), high.expand_as(ratio), mask,
                        per_row=config.level == "sequence" and advantages.dim() == 1, objective=config.objective)


def value_loss(values, old_values, returns, mask, *, clip=0.2):
    """``0.5 · masked_mean(max((v - R)², (clip(v, v_old ± clip) - R)²))``; returns ``(loss, metrics)``."""
    v.float_tensor("values", values)
    for name, t in (("old_values", old_values), ("returns", returns)):
        v.float_tensor(name, t)
        v.same_shape(name, t, values.shape, ref="values")
        v.same_device(name, t, values, "values")
    v.mask_tensor("mask", mask, values.shape, values)
    v.positive("clip", clip)
    _, impl = dispatch.select("value_loss", values.device)
    return impl(values, old_values, returns, mask, clip=float(clip))


# Each backend registers its token pass as "policy_loss"; the aggregation above is shared.
dispatch.register("policy_loss", "torch")(ref.policy_tokens)
dispatch.register("value_loss", "torch")(ref.value_loss)
