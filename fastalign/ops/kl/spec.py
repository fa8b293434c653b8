"""Spec: per-token KL estimators between the policy and a reference (d = ref_logp - logp)."""

from __future__ import annotations

import torch

from ..kinds import Kind

__all__ = ["kl_penalty"]  # gathered by fastalign.ops.reference


class KlKind(Kind):
    """Schulman's estimators of KL(policy || ref) from d = ref_logp - logp."""

    k1 = 0   # -d
    k2 = 1   # d² / 2
    k3 = 2   # exp(d) - d - 1
    abs = 3  # |d|


def kl_penalty(logp, ref_logp, *, kind="k3"):
    d = ref_logp.detach().float() - logp.float()
    kind = KlKind(KlKind.code(kind))
    if kind == KlKind.k1:
        return -d
    if kind == KlKind.k2:
        return 0.5 * d * d
    if kind == KlKind.k3:
        return torch.exp(d) - d - 1.0
    return d.abs()
