"""Spec: DPO family, SimPO and Bradley-Terry reward-model losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kinds import Kind

__all__ = ["dpo_loss", "simpo_loss", "bradley_terry_loss"]  # gathered by fastalign.ops.reference


class DpoLossType(Kind):
    """The DPO-family losses of a pair's log-ratio difference Δ."""

    sigmoid = 0  # −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)
    hinge = 1    # relu(1 − βΔ)
    ipo = 2      # (Δ − 1/(2β))²
    robust = 3   # (−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)) / (1 − 2ε)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0):
    chosen = policy_chosen_logps.float() - ref_chosen_logps.detach().float()
    rejected = policy_rejected_logps.float() - ref_rejected_logps.detach().float()
    delta = chosen - rejected
    loss_type = DpoLossType(DpoLossType.code(loss_type, "loss_type"))
    if loss_type == DpoLossType.sigmoid:
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  - label_smoothing * F.logsigmoid(-beta * delta))
    elif loss_type == DpoLossType.hinge:
        losses = torch.relu(1.0 - beta * delta)
    elif loss_type == DpoLossType.ipo:
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    else:  # DpoLossType.robust
        losses = ((-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                   + label_smoothing * F.logsigmoid(-beta * delta)) / (1.0 - 2.0 * label_smoothing))
    return losses, beta * chosen.detach(), beta * rejected.detach()


def simpo_loss(chosen_logps, rejected_logps, *, beta=2.0, gamma=0.5, label_smoothing=0.0):
    logits = beta * (chosen_logps.float() - rejected_logps.float()) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_logps.detach().float(), beta * rejected_logps.detach().float()


def bradley_terry_loss(chosen_rewards, rejected_rewards, *, margin=None, center_coef=0.0):
    rc, rr = chosen_rewards.float(), rejected_rewards.float()
    diff = rc - rr
    if margin is not None:
        diff = diff - (margin.float() if isinstance(margin, torch.Tensor) else float(margin))
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((rc + rr) ** 2).mean()
    with torch.no_grad():
        metrics = {"accuracy": (rc > rr).float().mean(), "margin": (rc - rr).mean()}
    return loss, metrics
