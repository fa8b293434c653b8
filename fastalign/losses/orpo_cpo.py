"""Fused-linear ORPO and CPO: reference-free pair losses plus the chosen NLL, from hidden states and the LM head."""

from __future__ import annotations

import torch

from fastalign import ops
from fastalign.ops import validation as v

from . import base
from .dpo import check_pairs, preference_metrics


def _reference_free(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_logps, ignore_index,
                    chunk_size, mem_budget, name):
    base.check_common(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                      ref_bias=ref_bias, ref_logps=ref_logps, ignore_index=ignore_index, chunk_size=chunk_size,
                      mem_budget=mem_budget)
    check_pairs(hidden, ref_logps)
    for arg, value in (("ref_hidden", ref_hidden), ("ref_logps", ref_logps)):
        if value is not None:
            raise ValueError(f"{arg} must be None: {name} uses no reference model, got a tensor")


def fused_linear_orpo_loss(hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                           ref_logps=None, beta=0.1, ignore_index=-100, chunk_size=None, mem_budget=None):
    """ORPO ``NLL_w − β·mean log σ(log_odds)`` from length-averaged log-probs (Liger's ``LigerFusedLinearORPOLoss``).

    Layout of :func:`fastalign.losses.fused_linear_dpo_loss` (``hidden [2B, T, H]``, chosen
    first), no reference. The NLL is the mean over all chosen completion tokens. Returns
    ``(loss, metrics)`` with TRL's names: rewards/* (``β·ℓ``), logps/chosen, logps/rejected,
    log_odds_ratio, log_odds_chosen, nll_loss, entropy.
    """
    _reference_free(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_logps, ignore_index,
                    chunk_size, mem_budget, "ORPO")
    v.positive("beta", beta)

    def per_pair(chosen, rejected, _ref_chosen, _ref_rejected):
        return ops.orpo_loss(chosen, rejected, beta=float(beta))[0]

    loss, info = base.pair_loss(hidden, weight, labels, per_pair, average=True, nll_coef=1.0, bias=bias,
                                ignore_index=ignore_index, chunk_size=chunk_size, mem_budget=mem_budget)
    metrics = preference_metrics(info, float(beta), reference=False)
    _, odds = ops.orpo_loss(info["chosen"], info["rejected"], beta=float(beta))
    metrics["log_odds_ratio"], metrics["log_odds_chosen"] = odds["log_odds_ratio"], odds["log_odds_chosen"]
    metrics["nll_loss"] = info["nll"]
    return loss, metrics


def fused_linear_cpo_loss(hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                          ref_logps=None, beta=0.1, alpha=1.0, label_smoothing=0.0, ignore_index=-100,
                          chunk_size=None, mem_budget=None):
    """CPO ``−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ) + α·NLL_w``, Δ of summed log-probs (Liger's ``LigerFusedLinearCPOLoss``).

    Layout of :func:`fastalign.losses.fused_linear_dpo_loss`, no reference; the NLL is the mean
    over the chosen completion tokens. Returns ``(loss, metrics)``: rewards/* (``β·logπ``),
    logps/chosen, logps/rejected (summed), nll_loss, entropy.
    """
    _reference_free(hidden, weight, labels, bias, ref_hidden, ref_weight, ref_bias, ref_logps, ignore_index,
                    chunk_size, mem_budget, "CPO")
    v.positive("beta", beta)
    v.positive("alpha", alpha, allow_zero=True)
    v.in_range("label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=False)

    def per_pair(chosen, rejected, _ref_chosen, _ref_rejected):
        return ops.cpo_loss(chosen, rejected, beta=float(beta), label_smoothing=float(label_smoothing))[0]

    loss, info = base.pair_loss(hidden, weight, labels, per_pair, average=False, nll_coef=float(alpha), bias=bias,
                                ignore_index=ignore_index, chunk_size=chunk_size, mem_budget=mem_budget)
    metrics = preference_metrics(info, float(beta), reference=False)
    metrics["nll_loss"] = info["nll"]
    return loss, metrics


class FusedLinearORPOLoss(torch.nn.Module):
    """ORPO loss over hidden states and the LM head (see :func:`fused_linear_orpo_loss`)."""

    def __init__(self, beta=0.1, ignore_index=-100, chunk_size=None, mem_budget=None):
        super().__init__()
        v.positive("beta", beta)
        self.beta, self.ignore_index, self.chunk_size, self.mem_budget = beta, ignore_index, chunk_size, mem_budget

    def forward(self, hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                ref_logps=None):
        return fused_linear_orpo_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                      ref_bias=ref_bias, ref_logps=ref_logps, beta=self.beta,
                                      ignore_index=self.ignore_index, chunk_size=self.chunk_size,
                                      mem_budget=self.mem_budget)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class FusedLinearCPOLoss(torch.nn.Module):
    """CPO loss over hidden states and the LM head (see :func:`fused_linear_cpo_loss`)."""

    def __init__(self, beta=0.1, alpha=1.0, label_smoothing=0.0, ignore_index=-100, chunk_size=None,
                 mem_budget=None):
        super().__init__()
        v.positive("beta", beta)
        v.positive("alpha", alpha, allow_zero=True)
        v.in_range("label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=False)
        self.beta, self.alpha, self.label_smoothing = beta, alpha, label_smoothing
        self.ignore_index, self.chunk_size, self.mem_budget = ignore_index, chunk_size, mem_budget

    def forward(self, hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                ref_logps=None):
        return fused_linear_cpo_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                     ref_bias=ref_bias, ref_logps=ref_logps, beta=self.beta, alpha=self.alpha,
                                     label_smoothing=self.label_smoothing, ignore_index=self.ignore_index,
                                     chunk_size=self.chunk_size, mem_budget=self.mem_budget)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, alpha={self.alpha}, label_smoothing={self.label_smoothing}"
