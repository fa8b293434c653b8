"""Spec: DPO family, SimPO and Bradley-Terry reward-model losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kinds import Kind

# gathered by fastalign.ops.reference
__all__ = ["dpo_loss", "simpo_loss", "bradley_terry_loss", "d2o_loss", "kto_loss", "orpo_loss", "cpo_loss"]


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


# ---------------------------------------------------------------- D²O, KTO, ORPO, CPO (issue 13)
# Each returns (losses [B], per-example tensors the public op turns into its metrics); the public
# functions in ``__init__`` build the metrics the same way for every backend.
def d2o_loss(policy_sample_logps, ref_sample_logps, policy_negative_logps, ref_negative_logps, *, beta=0.1,
             alpha=0.1):
    """D²O (Duan et al. 2024, Eq. 3): ``−log σ((β/K)·Σ_k s_k − α·s_neg)``, s = logπ − logπ_ref.

    Returns ``(losses, sample_rewards, negative_rewards)``: ``(β/K)·Σ_k s_k`` and ``α·s_neg``, so the
    loss is ``−log σ(sample_reward − negative_reward)`` and DPO's with K = 1, α = β.
    """
    samples = (policy_sample_logps.float() - ref_sample_logps.detach().float()).mean(-1)
    negative = policy_negative_logps.float() - ref_negative_logps.detach().float()
    sample_rewards, negative_rewards = beta * samples, alpha * negative
    losses = -F.logsigmoid(sample_rewards - negative_rewards)
    return losses, sample_rewards.detach(), negative_rewards.detach()


def kto_loss(policy_logps, ref_logps, desirable, kl_ref, *, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (TRL's KTOTrainer): ``λ_D·(1 − σ(β(r − z₀)))`` if desirable else ``λ_U·(1 − σ(β(z₀ − r)))``.

    ``r = logπ − logπ_ref``; ``kl_ref`` is the reference point z₀ (detached; TRL clamps it at 0
    before it gets here). Returns ``(losses, rewards)`` with rewards ``β·r``.
    """
    r = policy_logps.float() - ref_logps.detach().float()
    z0 = (kl_ref.detach().float() if isinstance(kl_ref, torch.Tensor) else torch.tensor(float(kl_ref)))
    z0 = z0.to(r.device)
    chosen = desirable_weight * (1.0 - torch.sigmoid(beta * (r - z0)))
    rejected = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - r)))
    losses = torch.where(desirable.bool(), chosen, rejected)
    return losses, beta * r.detach()


def orpo_log_odds(chosen_avg_logps, rejected_avg_logps):
    """``(ℓ_w − ℓ_l) − [log(1 − e^{ℓ_w}) − log(1 − e^{ℓ_l})]``; log(−expm1(ℓ)) is exact near ℓ = 0."""
    w, l_ = chosen_avg_logps.float(), rejected_avg_logps.float()
    return (w - l_) - (torch.log(-torch.expm1(w)) - torch.log(-torch.expm1(l_)))


def orpo_loss(chosen_avg_logps, rejected_avg_logps, *, beta=0.1):
    """ORPO's odds-ratio term ``−β·log σ(log_odds)`` from length-averaged log-probs (NLL added by the fused loss).

    Returns ``(losses, log_odds)``.
    """
    log_odds = orpo_log_odds(chosen_avg_logps, rejected_avg_logps)
    return -beta * F.logsigmoid(log_odds), log_odds.detach()


def cpo_loss(chosen_logps, rejected_logps, *, beta=0.1, label_smoothing=0.0):
    """CPO ``−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)``, Δ = logπ(y_w) − logπ(y_l) summed, no reference.

    Returns ``(losses, chosen_rewards, rejected_rewards)`` with rewards ``β·logπ``.
    """
    c, r = chosen_logps.float(), rejected_logps.float()
    x = beta * (c - r)
    losses = -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)
    return losses, beta * c.detach(), beta * r.detach()
