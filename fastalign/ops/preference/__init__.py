"""Preference losses: the DPO family, SimPO and the Bradley-Terry reward-model loss."""

from __future__ import annotations

import torch

from .. import dispatch
from .. import validation as v
from . import cpu, triton  # noqa: F401  (register the compiled and Triton backends)
from . import spec as ref
from .spec import DpoLossType

__all__ = ["dpo_loss", "simpo_loss", "bradley_terry_loss"]  # fastalign.ops re-exports these

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


dispatch.register("dpo_loss", "torch")(ref.dpo_loss)
dispatch.register("simpo_loss", "torch")(ref.simpo_loss)
dispatch.register("bradley_terry_loss", "torch")(ref.bradley_terry_loss)
