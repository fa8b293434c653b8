"""Fused-linear D²O: K reference samples as the positive, the human negative as the rejected, never ``N x V``."""

from __future__ import annotations

import torch

from fastalign import ops
from fastalign.ops import validation as v

from . import base


def check_groups(hidden, ref_logps, group_size: int, layout: str) -> None:
    """``hidden [B·G, T, H]`` with B >= 1; ``ref_logps`` ``[B·G]`` or ``[B·G, T]``."""
    if hidden.shape[0] < group_size or hidden.shape[0] % group_size:
        raise ValueError(f"hidden must hold B·{group_size} sequences ({layout}), got {hidden.shape[0]} "
                         f"(shape {tuple(hidden.shape)})")
    if ref_logps is not None:
        v.float_tensor("ref_logps", ref_logps)
        if tuple(ref_logps.shape) not in (tuple(hidden.shape[:1]), tuple(hidden.shape[:2])):
            raise ValueError(f"ref_logps must have shape {tuple(hidden.shape[:1])} (per-sequence sums) or "
                             f"{tuple(hidden.shape[:2])} (per token), got {tuple(ref_logps.shape)}")
        v.same_device("ref_logps", ref_logps, hidden, "hidden")


def fused_linear_d2o_loss(hidden, weight, labels, *, num_samples, bias=None, ref_hidden=None, ref_weight=None,
                          ref_bias=None, ref_logps=None, beta=0.1, alpha=0.1, ignore_index=-100, chunk_size=None,
                          mem_budget=None):
    """D²O (Duan et al. 2024, Eq. 3) from hidden states and the LM head, mean over the B prompts.

    Layout: ``hidden [B·(K+1), T, H]`` prompt by prompt — for prompt i, rows ``i·(K+1) … i·(K+1)+K−1``
    are its K responses sampled from the reference policy, row ``i·(K+1)+K`` its human negative.
    ``labels [B·(K+1), T]`` are the next tokens with ``ignore_index`` on prompt and padding.
    ``K = num_samples``. Sequence log-probs are summed over tokens; the reference is ``ref_hidden``
    (through ``ref_weight``/``ref_bias``, default the policy head) or precomputed ``ref_logps``
    (``[B·(K+1)]`` sums or per token). A prompt's K+1 sequences form one group of the chunk loop
    (:func:`fastalign.losses.base.group_loss`): when their logits do not fit ``mem_budget`` they
    are token-chunked, so memory does not grow with K. Returns ``(loss, metrics)``:
    ``rewards/samples``, ``rewards/negative``, ``rewards/margins``, ``rewards/accuracies`` (see
    :func:`fastalign.ops.d2o_loss`), ``logps/samples``, ``logps/negative``, ``entropy``.
    """
    base.check_common(hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                      ref_bias=ref_bias, ref_logps=ref_logps, ignore_index=ignore_index, chunk_size=chunk_size,
                      mem_budget=mem_budget)
    k = v.integer("num_samples", num_samples, minimum=1)
    check_groups(hidden, ref_logps, k + 1, "for each prompt its K samples, then its negative")
    if ref_hidden is None and ref_logps is None:
        raise ValueError("D²O needs the reference model: pass ref_hidden (its LM head ref_weight defaults to weight) "
                         "or precomputed ref_logps; got neither")
    v.positive("beta", beta)
    v.positive("alpha", alpha)
    b = hidden.shape[0] // (k + 1)
    rows = torch.arange(b * (k + 1), dtype=torch.int64).reshape(b, k + 1)

    def per_group(_groups, scores, ref_scores):
        losses, _ = ops.d2o_loss(scores[:, :k], ref_scores[:, :k], scores[:, k], ref_scores[:, k], beta=float(beta),
                                 alpha=float(alpha))
        return losses

    loss, info = base.group_loss(hidden, weight, labels, per_group, rows=rows, average=False, bias=bias,
                                 ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps,
                                 ignore_index=ignore_index, chunk_size=chunk_size, mem_budget=mem_budget)
    sums, ref_sums = info["sums"].reshape(b, k + 1), info["ref_sums"].reshape(b, k + 1)
    _, metrics = ops.d2o_loss(sums[:, :k], ref_sums[:, :k], sums[:, k], ref_sums[:, k], beta=float(beta),
                              alpha=float(alpha))
    metrics["logps/samples"] = sums[:, :k].mean()
    metrics["logps/negative"] = sums[:, k].mean()
    metrics["entropy"] = info["entropy_sum"] / max(1, info["n_tokens"])
    return loss, metrics


class FusedLinearD2OLoss(torch.nn.Module):
    """D²O loss over hidden states and the LM head (see :func:`fused_linear_d2o_loss` for the layout)."""

    def __init__(self, num_samples, beta=0.1, alpha=0.1, ignore_index=-100, chunk_size=None, mem_budget=None):
        super().__init__()
        v.integer("num_samples", num_samples, minimum=1)
        v.positive("beta", beta)
        v.positive("alpha", alpha)
        self.num_samples, self.beta, self.alpha = num_samples, beta, alpha
        self.ignore_index, self.chunk_size, self.mem_budget = ignore_index, chunk_size, mem_budget

    def forward(self, hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                ref_logps=None):
        return fused_linear_d2o_loss(hidden, weight, labels, num_samples=self.num_samples, bias=bias,
                                     ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
                                     ref_logps=ref_logps, beta=self.beta, alpha=self.alpha,
                                     ignore_index=self.ignore_index, chunk_size=self.chunk_size,
                                     mem_budget=self.mem_budget)

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, beta={self.beta}, alpha={self.alpha}"
