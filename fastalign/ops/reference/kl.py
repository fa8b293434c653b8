"""Spec: per-token KL estimators between the policy and a reference (d = ref_logp - logp)."""

from __future__ import annotations

import torch


def kl_penalty(logp, ref_logp, *, kind="k3"):
    d = ref_logp.detach().float() - logp.float()
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.exp(d) - d - 1.0
    return d.abs()
