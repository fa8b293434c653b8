"""Spec: per-token log-probs and entropy, from logits or from hidden states and an LM head."""

from __future__ import annotations

import torch

__all__ = ["token_logprobs", "logprobs_from_logits", "sequence_logprobs"]  # gathered by fastalign.ops.reference


def logprobs_from_logits(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    z = logits.float() / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    # A label outside [0, V) that is not ignore_index (value checks off) gives NaN, never an index error.
    inside = (labels >= 0) & (labels < z.shape[-1])
    safe = torch.where(valid & inside, labels, torch.zeros_like(labels)).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid & ~inside, torch.full_like(logp, float("nan")), logp)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


def token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                   return_entropy=False, chunk_size=None):
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    return logprobs_from_logits(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                return_entropy=return_entropy)


def sequence_logprobs(token_logp, mask, *, average=False):
    m = mask.to(torch.float32)
    total = (token_logp.float() * m).sum(-1)
    return total / m.sum(-1) if average else total
