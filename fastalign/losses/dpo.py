"""Fused-linear DPO: the loss from hidden states and the LM head, pair by pair, never ``N x V``."""

from __future__ import annotations

import torch

from fastalign import ops
from fastalign.ops import validation as v
from fastalign.ops.preference import DPO_LOSS_TYPES

from . import base


def preference_metrics(info, beta: float, *, reference: bool) -> dict:
    """The metrics TRL's trainers log for a preference batch (means over the B pairs, 0-d tensors).

    With a reference (DPO): rewards ``beta * (logp - ref_logp)`` and logps of the summed log-probs,
    as TRL logs them even for IPO. Without (SimPO/CPO): rewards ``beta * score`` and logps are the
    length-averaged scores.
    """
    if reference:
        chosen, rejected = info["chosen_sum"], info["rejected_sum"]
        chosen_r = beta * (chosen - info["ref_chosen_sum"])
        rejected_r = beta * (rejected - info["ref_rejected_sum"])
    else:
        chosen, rejected = info["chosen"], info["rejected"]
        chosen_r, rejected_r = beta * chosen, beta * rejected
    metrics = {
        "rewards/chosen": chosen_r.mean(),
        "rewards/rejected": rejected_r.mean(),
        "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
        "rewards/margins": (chosen_r - rejected_r).mean(),
        "logps/chosen": chosen.mean(),
        "logps/rejected": rejected.mean(),
        "entropy": info["entropy_sum"] / max(1, info["n_tokens"]),
    }
    return metrics


def fused_linear_dpo_loss(hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                          ref_logps=None, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, nll_coef=0.0,
                          ignore_index=-100, chunk_size=None, mem_budget=None, head_metrics=False):
    """DPO from policy hidden states ``[2B, T, H]`` (B chosen, then B rejected) and the LM head ``[V, H]``.

    ``labels [2B, T]`` are the next tokens, ``ignore_index`` on prompt and padding (shifted by the
    caller). The reference is ``ref_hidden`` through ``ref_weight``/``ref_bias`` (default: the
    policy head ``weight``/``bias``), or precomputed ``ref_logps`` (``[2B]`` sums or ``[2B, T]``).
    ``loss_type``: ``sigmoid`` (with conservative ``label_smoothing``), ``hinge``, ``ipo``
    (length-averaged log-probs, as TRL) or ``robust``. ``nll_coef`` adds that times the mean NLL
    of the chosen tokens (RPO / Liger's ``compute_nll_loss``). Returns ``(loss, metrics)`` with
    TRL's metric names (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
    logps/chosen, logps/rejected, entropy, and nll_loss when ``nll_coef > 0``). ``head_metrics=True``
    adds TRL's logits/chosen, logits/rejected (mean logit of each side's tokens) and mean_token_accuracy
    (the chosen tokens that are their logits' argmax), read off the logits the loss computes anyway.
    """
    base.check_common(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                      ref_bias=ref_bias, ref_logps=ref_logps, ignore_index=ignore_index, chunk_size=chunk_size,
                      mem_budget=mem_budget)
    check_pairs(hidden, ref_logps)
    if ref_hidden is None and ref_logps is None:
        raise ValueError("DPO needs the reference model: pass ref_hidden (its LM head ref_weight defaults to weight) "
                         "or precomputed ref_logps; got neither")
    v.positive("beta", beta)
    v.choice("loss_type", loss_type, DPO_LOSS_TYPES)
    v.in_range("label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=False)
    v.positive("nll_coef", nll_coef, allow_zero=True)

    def per_pair(chosen, rejected, ref_chosen, ref_rejected):
        losses, _, _ = ops.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=float(beta),
                                    loss_type=loss_type, label_smoothing=float(label_smoothing))
        return losses

    loss, info = base.pair_loss(hidden, weight, labels, per_pair, average=loss_type == "ipo", nll_coef=float(nll_coef),
                                bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
                                ref_logps=ref_logps, ignore_index=ignore_index, chunk_size=chunk_size,
                                mem_budget=mem_budget, head_extras=("mean_logit", "is_top1") if head_metrics else ())
    metrics = preference_metrics(info, float(beta), reference=True)
    if head_metrics:
        metrics.update(head_metrics_of(info["extras"], labels != ignore_index))
    if nll_coef:
        metrics["nll_loss"] = info["nll"]
    return loss, metrics


def head_metrics_of(extras, valid) -> dict:
    """TRL's logits/chosen, logits/rejected and mean_token_accuracy (0-d) from per-token extras ``[2B, T]``."""
    b = valid.shape[0] // 2
    chosen, rejected = valid[:b], valid[b:]
    mean_logit, is_top1 = extras["mean_logit"], extras["is_top1"]
    return {
        "logits/chosen": (mean_logit[:b] * chosen).sum() / chosen.sum().clamp(min=1),
        "logits/rejected": (mean_logit[b:] * rejected).sum() / rejected.sum().clamp(min=1),
        "mean_token_accuracy": (is_top1[:b] & chosen).sum() / chosen.sum().clamp(min=1),
    }


def check_pairs(hidden, ref_logps) -> None:
    """Preference layout: ``hidden [2B, T, H]`` with B >= 1; ``ref_logps`` ``[2B]`` or ``[2B, T]``."""
    if hidden.shape[0] < 2 or hidden.shape[0] % 2:
        raise ValueError(f"hidden must hold 2B sequences (B chosen, then B rejected), got {hidden.shape[0]} "
                         f"(shape {tuple(hidden.shape)})")
    if ref_logps is not None:
        v.float_tensor("ref_logps", ref_logps)
        if tuple(ref_logps.shape) not in (tuple(hidden.shape[:1]), tuple(hidden.shape[:2])):
            raise ValueError(f"ref_logps must have shape {tuple(hidden.shape[:1])} (per-sequence sums) or "
                             f"{tuple(hidden.shape[:2])} (per token), got {tuple(ref_logps.shape)}")
        v.same_device("ref_logps", ref_logps, hidden, "hidden")


class FusedLinearDPOLoss(torch.nn.Module):
    """DPO loss over hidden states and the LM head (see :func:`fused_linear_dpo_loss`).

    Pair by pair: each pair's chosen and rejected tokens (plus the reference pass) are one chunk
    when their logits fit ``mem_budget`` (default ``FASTALIGN_MEM_BUDGET``, 256 MiB), else they
    are token-chunked and recomputed; memory never grows with the sequence length beyond that.
    """

    def __init__(self, beta=0.1, loss_type="sigmoid", label_smoothing=0.0, nll_coef=0.0, ignore_index=-100,
                 chunk_size=None, mem_budget=None, head_metrics=False):
        super().__init__()
        v.positive("beta", beta)
        v.choice("loss_type", loss_type, DPO_LOSS_TYPES)
        v.in_range("label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=False)
        v.positive("nll_coef", nll_coef, allow_zero=True)
        self.beta, self.loss_type, self.label_smoothing, self.nll_coef = beta, loss_type, label_smoothing, nll_coef
        self.ignore_index, self.chunk_size, self.mem_budget = ignore_index, chunk_size, mem_budget
        self.head_metrics = bool(head_metrics)

    def forward(self, hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                ref_logps=None):
        return fused_linear_dpo_loss(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                     ref_bias=ref_bias, ref_logps=ref_logps, beta=self.beta, loss_type=self.loss_type,
                                     label_smoothing=self.label_smoothing, nll_coef=self.nll_coef,
                                     ignore_index=self.ignore_index, chunk_size=self.chunk_size,
                                     mem_budget=self.mem_budget, head_metrics=self.head_metrics)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}, " \
               f"nll_coef={self.nll_coef}"
