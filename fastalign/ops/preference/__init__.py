"""Preference losses: the DPO family, SimPO, the Bradley-Terry reward-model loss, D²O, KTO, ORPO and CPO."""

from __future__ import annotations

import torch

from .. import dispatch
from .. import validation as v
from . import cpu, triton  # noqa: F401  (register the compiled and Triton backends)
from . import spec as ref
from .spec import DpoLossType

# fastalign.ops re-exports these
__all__ = ["dpo_loss", "simpo_loss", "bradley_terry_loss", "d2o_loss", "kto_loss", "orpo_loss", "cpo_loss"]

DPO_LOSS_TYPES = DpoLossType.names()


def _check_pair_vectors(names_tensors):
    first_name, first = names_tensors[0]
    v.float_tensor(first_name, first, dim=1)
    for name, t in names_tensors[1:]:
        v.float_tensor(name, t, dim=1)
        v.same_shape(name, t, first.shape, ref=first_name)
        v.same_device(name, t, first, first_name)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0):
    """DPO losses per pair from ``[B]`` sequence log-probs.

    ``loss_type``: ``sigmoid`` (−log σ(βΔ), with TRL's conservative label smoothing),
    ``hinge``, ``ipo`` (feed length-averaged log-probs, as TRL does) or ``robust``. Returns
    ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` with rewards = β·(policy − ref).
    """
    _check_pair_vectors([("policy_chosen_logps", policy_chosen_logps),
                         ("policy_rejected_logps", policy_rejected_logps),
                         ("ref_chosen_logps", ref_chosen_logps),
                         ("ref_rejected_logps", ref_rejected_logps)])
    v.positive("beta", beta)
    v.choice("loss_type", loss_type, DPO_LOSS_TYPES)
    v.in_range("label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=False)
    _, impl = dispatch.select("dpo_loss", policy_chosen_logps.device)
    return impl(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                beta=float(beta), loss_type=loss_type, label_smoothing=float(label_smoothing))


def simpo_loss(chosen_logps, rejected_logps, *, beta=2.0, gamma=0.5, label_smoothing=0.0):
    """SimPO ``−log σ(β·(avg_logp_w − avg_logp_l) − γ)`` from length-averaged log-probs ``[B]``."""
    _check_pair_vectors([("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps)])
    v.positive("beta", beta)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma != gamma:
        raise TypeError(f"gamma must be a finite number, got {gamma!r}")
    v.in_range("label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=False)
    _, impl = dispatch.select("simpo_loss", chosen_logps.device)
    return impl(chosen_logps, rejected_logps, beta=float(beta), gamma=float(gamma),
                label_smoothing=float(label_smoothing))


def bradley_terry_loss(chosen_rewards, rejected_rewards, *, margin=None, center_coef=0.0):
    """Reward-model loss ``mean(−log σ(r_w − r_l − margin)) + c·mean((r_w + r_l)²)``.

    ``margin`` is a number or a ``[B]`` tensor. Returns ``(loss, metrics)`` with ``accuracy``
    (mean of r_w > r_l) and ``margin`` (mean of r_w − r_l).
    """
    _check_pair_vectors([("chosen_rewards", chosen_rewards), ("rejected_rewards", rejected_rewards)])
    if chosen_rewards.numel() == 0:
        raise ValueError("chosen_rewards must hold at least one pair, got an empty tensor")
    if isinstance(margin, torch.Tensor):
        v.float_tensor("margin", margin, dim=1)
        v.same_shape("margin", margin, chosen_rewards.shape, ref="chosen_rewards")
        v.same_device("margin", margin, chosen_rewards, "chosen_rewards")
    elif margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise TypeError(f"margin must be None, a number or a [B] tensor, got {type(margin).__name__}")
    v.positive("center_coef", center_coef, allow_zero=True)
    _, impl = dispatch.select("bradley_terry_loss", chosen_rewards.device)
    return impl(chosen_rewards, rejected_rewards, margin=margin, center_coef=float(center_coef))


# ---------------------------------------------------------------- D²O, KTO, ORPO, CPO (issue 13)
def _mean(x):
    return x.mean() if x.numel() else x.new_zeros(())


def d2o_loss(policy_sample_logps, ref_sample_logps, policy_negative_logps, ref_negative_logps, *, beta=0.1,
             alpha=0.1):
    """D²O losses per prompt: ``−log σ((β/K)·Σ_k s_k − α·s_neg)`` with ``s = logπ − logπ_ref``.

    ``*_sample_logps [B, K]``: summed log-probs of K responses sampled from the reference policy
    (the distributional positive); ``*_negative_logps [B]``: the human negative. The reference
    inputs are detached. K = 1 with α = β is DPO with the sample as the chosen response.
    Returns ``(losses [B], metrics)``: ``rewards/samples`` (mean of ``(β/K)·Σ_k s_k``),
    ``rewards/negative`` (mean of ``α·s_neg``), ``rewards/margins`` and ``rewards/accuracies``
    (the fraction of prompts whose sample reward beats the negative's).
    """
    v.float_tensor("policy_sample_logps", policy_sample_logps, dim=2)
    v.float_tensor("ref_sample_logps", ref_sample_logps, dim=2)
    v.same_shape("ref_sample_logps", ref_sample_logps, policy_sample_logps.shape, ref="policy_sample_logps")
    v.same_device("ref_sample_logps", ref_sample_logps, policy_sample_logps, "policy_sample_logps")
    if policy_sample_logps.shape[1] < 1:
        raise ValueError(f"policy_sample_logps must hold K >= 1 samples per prompt, got shape "
                         f"{tuple(policy_sample_logps.shape)}")
    b = policy_sample_logps.shape[0]
    for name, t in (("policy_negative_logps", policy_negative_logps), ("ref_negative_logps", ref_negative_logps)):
        v.float_tensor(name, t, dim=1)
        v.same_shape(name, t, (b,), ref="policy_sample_logps' [B]")
        v.same_device(name, t, policy_sample_logps, "policy_sample_logps")
    v.positive("beta", beta)
    v.positive("alpha", alpha)
    _, impl = dispatch.select("d2o_loss", policy_sample_logps.device)
    losses, sample_rewards, negative_rewards = impl(policy_sample_logps, ref_sample_logps, policy_negative_logps,
                                                    ref_negative_logps, beta=float(beta), alpha=float(alpha))
    metrics = {"rewards/samples": _mean(sample_rewards), "rewards/negative": _mean(negative_rewards),
               "rewards/margins": _mean(sample_rewards - negative_rewards),
               "rewards/accuracies": _mean((sample_rewards > negative_rewards).float())}
    return losses, metrics


def kto_loss(policy_logps, ref_logps, desirable, kl_ref, *, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO losses per example, as TRL's ``KTOTrainer`` (``loss_type="kto"``).

    ``r = logπ − logπ_ref`` from ``[B]`` summed log-probs; ``desirable [B]`` bool; ``kl_ref`` the
    detached reference point z₀ (a number or 0-d tensor; the fused loss estimates it from
    mismatched pairs, ``max(0, mean(logπ(y'|x) − logπ_ref(y'|x)))``). Desirable:
    ``λ_D·(1 − σ(β(r − z₀)))``, undesirable: ``λ_U·(1 − σ(β(z₀ − r)))``. Returns
    ``(losses [B], metrics)``: ``rewards/chosen``, ``rewards/rejected`` (mean ``β·r`` over each
    side, 0 when a side is empty), ``rewards/margins`` (their difference), ``kl`` (z₀).
    """
    _check_pair_vectors([("policy_logps", policy_logps), ("ref_logps", ref_logps)])
    v.tensor("desirable", desirable, dtypes=(torch.bool,), dim=1)
    v.same_shape("desirable", desirable, policy_logps.shape, ref="policy_logps")
    v.same_device("desirable", desirable, policy_logps, "policy_logps")
    if isinstance(kl_ref, torch.Tensor):
        v.float_tensor("kl_ref", kl_ref, dim=0)
        v.same_device("kl_ref", kl_ref, policy_logps, "policy_logps")
        kl_ref = kl_ref.detach()
    elif isinstance(kl_ref, bool) or not isinstance(kl_ref, (int, float)) or kl_ref != kl_ref:
        raise TypeError(f"kl_ref must be a finite number or a 0-d float tensor, got {kl_ref!r}")
    else:
        kl_ref = torch.tensor(float(kl_ref), dtype=torch.float32, device=policy_logps.device)
    v.positive("beta", beta)
    v.positive("desirable_weight", desirable_weight, allow_zero=True)
    v.positive("undesirable_weight", undesirable_weight, allow_zero=True)
    _, impl = dispatch.select("kto_loss", policy_logps.device)
    losses, rewards = impl(policy_logps, ref_logps, desirable, kl_ref, beta=float(beta),
                           desirable_weight=float(desirable_weight), undesirable_weight=float(undesirable_weight))
    d = desirable.float()
    chosen = (rewards * d).sum() / d.sum().clamp(min=1)
    rejected = (rewards * (1 - d)).sum() / (1 - d).sum().clamp(min=1)
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
               "kl": kl_ref.float()}
    return losses, metrics


def orpo_loss(chosen_avg_logps, rejected_avg_logps, *, beta=0.1):
    """ORPO's odds-ratio term per pair, ``−β·log σ(log_odds)``, from length-averaged log-probs ``[B]`` (< 0).

    ``log_odds = (ℓ_w − ℓ_l) − [log(1 − e^{ℓ_w}) − log(1 − e^{ℓ_l})]``. The NLL term of ORPO is
    added by :class:`fastalign.losses.FusedLinearORPOLoss`. Returns ``(losses [B], metrics)`` with
    TRL's names: ``rewards/chosen`` (mean ``β·ℓ_w``), ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies``, ``log_odds_ratio`` (mean ``log σ(log_odds)``), ``log_odds_chosen``.
    """
    _check_pair_vectors([("chosen_avg_logps", chosen_avg_logps), ("rejected_avg_logps", rejected_avg_logps)])
    v.positive("beta", beta)
    _, impl = dispatch.select("orpo_loss", chosen_avg_logps.device)
    losses, log_odds = impl(chosen_avg_logps, rejected_avg_logps, beta=float(beta))
    chosen_r, rejected_r = beta * chosen_avg_logps.detach().float(), beta * rejected_avg_logps.detach().float()
    metrics = {"rewards/chosen": _mean(chosen_r), "rewards/rejected": _mean(rejected_r),
               "rewards/margins": _mean(chosen_r - rejected_r),
               "rewards/accuracies": _mean((chosen_r > rejected_r).float()),
               "log_odds_ratio": _mean(torch.nn.functional.logsigmoid(log_odds)),
               "log_odds_chosen": _mean(log_odds)}
    return losses, metrics


def cpo_loss(chosen_logps, rejected_logps, *, beta=0.1, label_smoothing=0.0):
    """CPO per pair, ``−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)``, Δ = logπ(y_w) − logπ(y_l) (summed), no reference.

    The NLL term (``α·NLL_w``) is added by :class:`fastalign.losses.FusedLinearCPOLoss`. Returns
    ``(losses [B], metrics)``: ``rewards/chosen`` (mean ``β·logπ(y_w)``), ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies``.
    """
    _check_pair_vectors([("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps)])
    v.positive("beta", beta)
    v.in_range("label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=False)
    _, impl = dispatch.select("cpo_loss", chosen_logps.device)
    losses, chosen_r, rejected_r = impl(chosen_logps, rejected_logps, beta=float(beta),
                                        label_smoothing=float(label_smoothing))
    metrics = {"rewards/chosen": _mean(chosen_r), "rewards/rejected": _mean(rejected_r),
               "rewards/margins": _mean(chosen_r - rejected_r),
               "rewards/accuracies": _mean((chosen_r > rejected_r).float())}
    return losses, metrics


dispatch.register("dpo_loss", "torch")(ref.dpo_loss)
dispatch.register("simpo_loss", "torch")(ref.simpo_loss)
dispatch.register("bradley_terry_loss", "torch")(ref.bradley_terry_loss)
dispatch.register("d2o_loss", "torch")(ref.d2o_loss)
dispatch.register("kto_loss", "torch")(ref.kto_loss)
dispatch.register("orpo_loss", "torch")(ref.orpo_loss)
dispatch.register("cpo_loss", "torch")(ref.cpo_loss)
