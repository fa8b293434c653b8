"""Fused-linear SimPO: reference-free, length-averaged preference loss from hidden states and the LM head."""

from __future__ import annotations

import torch

from fastalign import ops
from fastalign.ops import validation as v

from . import base
from .dpo import check_pairs, preference_metrics


def fused_linear_simpo_loss(hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                            ref_logps=None, beta=2.0, gamma=0.5, label_smoothing=0.0, nll_coef=0.0,
                            ignore_index=-100, chunk_size=None, mem_budget=None):
    """SimPO ``−log σ(β·(avg_logp_w − avg_logp_l) − γ)`` averaged over the B pairs.

    Same layout as :func:`fastalign.losses.fused_linear_dpo_loss` (``hidden [2B, T, H]``, chosen
    first). SimPO has no reference model, so ``ref_hidden``, ``ref_weight``, ``ref_bias`` and
    ``ref_logps`` must stay None (they are in the signature so every loss is called alike).
    ``nll_coef`` adds the chosen tokens' mean NLL (CPO's ``cpo_alpha``). TRL's CPO trainer with
    ``loss_type="simpo"`` computes the same loss with ``simpo_gamma = gamma``.
    Returns ``(loss, metrics)``; rewards are ``beta * avg_logp``.
    """
    base.check_common(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                      ref_bias=ref_bias, ref_logps=ref_logps, ignore_index=ignore_index, chunk_size=chunk_size,
                      mem_budget=mem_budget)
    check_pairs(hidden, ref_logps)
    for name, value in (("ref_hidden", ref_hidden), ("ref_logps", ref_logps)):
        if value is not None:
            raise ValueError(f"{name} must be None: SimPO uses no reference model, got a tensor")
    v.positive("beta", beta)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma != gamma:
        raise TypeError(f"gamma must be a finite number, got {gamma!r}")
    v.in_range("label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=False)
    v.positive("nll_coef", nll_coef, allow_zero=True)

    def per_pair(chosen, rejected, _ref_chosen, _ref_rejected):
        losses, _, _ = ops.simpo_loss(chosen, rejected, beta=float(beta), gamma=float(gamma),
                                      label_smoothing=float(label_smoothing))
        return losses

    loss, info = base.pair_loss(hidden, weight, labels, per_pair, average=True, nll_coef=float(nll_coef), bias=bias,
                                ignore_index=ignore_index, chunk_size=chunk_size, mem_budget=mem_budget)
    metrics = preference_metrics(info, float(beta), reference=False)
    if nll_coef:
        metrics["nll_loss"] = info["nll"]
    return loss, metrics


class FusedLinearSimPOLoss(torch.nn.Module):
    """SimPO loss over hidden states and the LM head (see :func:`fused_linear_simpo_loss`)."""

    def __init__(self, beta=2.0, gamma=0.5, label_smoothing=0.0, nll_coef=0.0, ignore_index=-100, chunk_size=None,
                 mem_budget=None):
        super().__init__()
        v.positive("beta", beta)
        v.in_range("label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=False)
        v.positive("nll_coef", nll_coef, allow_zero=True)
        self.beta, self.gamma, self.label_smoothing, self.nll_coef = beta, gamma, label_smoothing, nll_coef
        self.ignore_index, self.chunk_size, self.mem_budget = ignore_index, chunk_size, mem_budget

    def forward(self, hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                ref_logps=None):
        return fused_linear_simpo_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden,
                                       ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps, beta=self.beta,
                                       gamma=self.gamma, label_smoothing=self.label_smoothing,
                                       nll_coef=self.nll_coef, ignore_index=self.ignore_index,
                                       chunk_size=self.chunk_size, mem_budget=self.mem_budget)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, label_smoothing={self.label_smoothing}, nll_coef={self.nll_coef}"
