"""Fused-linear KTO: unpaired desirable/undesirable completions, the KL reference point in the same call."""

from __future__ import annotations

import torch

from fastalign import ops
from fastalign.ops import validation as v
from fastalign.ops.logprobs import chunked

from . import base
from .d2o import check_groups


def _sequence_sums(hidden2d, weight, bias, labels, rows, t_, ignore_index, chunk_size, mem_budget):
    """No-grad summed log-probs of the sequences ``rows`` (only their valid tokens cost a GEMM)."""
    valid = labels[rows] != ignore_index
    local_row, col = valid.nonzero(as_tuple=True)
    pos = rows.to(labels.device)[local_row] * t_ + col
    lp, _ = chunked.linear_logprobs_no_grad(hidden2d.index_select(0, pos), weight, labels.reshape(-1)[pos],
                                            bias=bias, ignore_index=ignore_index, chunk_size=chunk_size,
                                            mem_budget=mem_budget)
    return torch.zeros(rows.numel(), dtype=torch.float32, device=lp.device).index_add_(0, local_row, lp)


def fused_linear_kto_loss(hidden, weight, labels, desirable, *, bias=None, ref_hidden=None, ref_weight=None,
                          ref_bias=None, ref_logps=None, kl_ref=None, beta=0.1, desirable_weight=1.0,
                          undesirable_weight=1.0, ignore_index=-100, chunk_size=None, mem_budget=None):
    """KTO as TRL's ``KTOTrainer`` (``loss_type="kto"``), mean over the B completions.

    Layout: ``hidden [2B, T, H]`` — rows ``0 … B−1`` the completions ``(x_i, y_i)`` labelled by
    ``desirable [B]`` (bool), rows ``B … 2B−1`` the mismatched pairs ``(x_i, y_{i−1})`` (TRL
    shifts the completions by one within the batch) from which the reference point
    ``z₀ = max(0, mean(logπ(y'|x) − logπ_ref(y'|x)))`` is estimated in this same call, without
    gradient (as TRL). With ``kl_ref`` given (a number or 0-d tensor, e.g. gathered across ranks),
    ``hidden`` is ``[B, T, H]`` and holds only the completions. The reference is ``ref_hidden``
    (same rows; LM head ``ref_weight`` defaults to ``weight``) or ``ref_logps`` (``[S]`` sums or
    ``[S, T]``). Returns ``(loss, metrics)``: ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``kl``, ``logps/chosen``, ``logps/rejected``, ``entropy``.
    """
    base.check_common(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                      ref_bias=ref_bias, ref_logps=ref_logps, ignore_index=ignore_index, chunk_size=chunk_size,
                      mem_budget=mem_budget)
    estimate = kl_ref is None
    check_groups(hidden, ref_logps, 2 if estimate else 1,
                 "the B completions, then their B mismatched KL sequences" if estimate else "the B completions")
    b = hidden.shape[0] // 2 if estimate else hidden.shape[0]
    v.tensor("desirable", desirable, dtypes=(torch.bool,), dim=1)
    v.same_shape("desirable", desirable, (b,), ref="the B completions")
    v.same_device("desirable", desirable, hidden, "hidden")
    if ref_hidden is None and ref_logps is None:
        raise ValueError("KTO needs the reference model: pass ref_hidden (its LM head ref_weight defaults to weight) "
                         "or precomputed ref_logps; got neither")
    v.positive("beta", beta)
    v.positive("desirable_weight", desirable_weight, allow_zero=True)
    v.positive("undesirable_weight", undesirable_weight, allow_zero=True)

    s_, t_, h_ = hidden.shape
    if estimate:
        kl_rows = torch.arange(b, 2 * b, device=hidden.device)
        policy_kl = _sequence_sums(hidden.detach().reshape(s_ * t_, h_), weight.detach(),
                                   None if bias is None else bias.detach(), labels, kl_rows, t_, ignore_index,
                                   chunk_size, mem_budget)
        if ref_logps is not None:
            r = ref_logps.detach().float()
            ref_kl = ((r * (labels != ignore_index)).sum(1) if r.dim() == 2 else r)[b:]
        else:
            ref_w, ref_b = base.reference_head(weight, bias, ref_weight, ref_bias)
            ref_kl = _sequence_sums(ref_hidden.detach().reshape(s_ * t_, ref_hidden.shape[2]), ref_w, ref_b, labels,
                                    kl_rows, t_, ignore_index, chunk_size, mem_budget)
        kl_ref = (policy_kl - ref_kl).mean().clamp(min=0)
    elif not isinstance(kl_ref, torch.Tensor):
        kl_ref = torch.tensor(float(kl_ref), dtype=torch.float32, device=hidden.device)
    rows = torch.arange(b, dtype=torch.int64)[:, None]

    def per_group(groups, scores, ref_scores):
        losses, _ = ops.kto_loss(scores[:, 0], ref_scores[:, 0], desirable.index_select(0, groups), kl_ref,
                                 beta=float(beta), desirable_weight=float(desirable_weight),
                                 undesirable_weight=float(undesirable_weight))
        return losses

    loss, info = base.group_loss(hidden, weight, labels, per_group, rows=rows, average=False, bias=bias,
                                 ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps,
                                 ignore_index=ignore_index, chunk_size=chunk_size, mem_budget=mem_budget)
    sums, ref_sums = info["sums"][:b], info["ref_sums"][:b]
    _, metrics = ops.kto_loss(sums, ref_sums, desirable, kl_ref, beta=float(beta))
    d = desirable.float()
    metrics["logps/chosen"] = (sums * d).sum() / d.sum().clamp(min=1)
    metrics["logps/rejected"] = (sums * (1 - d)).sum() / (1 - d).sum().clamp(min=1)
    metrics["entropy"] = info["entropy_sum"] / max(1, info["n_tokens"])
    return loss, metrics


class FusedLinearKTOLoss(torch.nn.Module):
    """KTO loss over hidden states and the LM head (see :func:`fused_linear_kto_loss` for the layout)."""

    def __init__(self, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, ignore_index=-100, chunk_size=None,
                 mem_budget=None):
        super().__init__()
        v.positive("beta", beta)
        v.positive("desirable_weight", desirable_weight, allow_zero=True)
        v.positive("undesirable_weight", undesirable_weight, allow_zero=True)
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self.ignore_index, self.chunk_size, self.mem_budget = ignore_index, chunk_size, mem_budget

    def forward(self, hidden, weight, labels, desirable, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                ref_logps=None, kl_ref=None):
        return fused_linear_kto_loss(hidden, weight, labels, desirable, bias=bias, ref_hidden=ref_hidden,
                                     ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps, kl_ref=kl_ref,
                                     beta=self.beta, desirable_weight=self.desirable_weight,
                                     undesirable_weight=self.undesirable_weight, ignore_index=self.ignore_index,
                                     chunk_size=self.chunk_size, mem_budget=self.mem_budget)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, desirable_weight={self.desirable_weight}, " \
               f"undesirable_weight={self.undesirable_weight}"
