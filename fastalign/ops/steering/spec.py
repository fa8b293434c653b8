"""Spec: token-level steering of next-token logits (Linear Alignment, ROSE, classifier-free guidance).

Every branch is the same model's logits for the same next position under a different prompt:
``value`` (with the value / persona instruction), ``base`` (without it) and K ``negatives``
(contrary instructions). In float32:

    z = value + alpha * (value - base) - sum_j betas[j] * (negatives[j] - base)
    out = z / temperature, with -inf outside the top-p set of softmax(value / temperature)

The top-p set is the smallest set of most probable tokens (under the value-conditioned
distribution) whose mass reaches ``top_p``, grown to at least ``min_tokens_to_keep`` tokens.
Tie rule: let ``t`` be the probability of the last token that set needs (rank
``max(k, min_tokens_to_keep - 1)`` in descending order, ``k`` the first rank whose cumulative
mass reaches ``top_p``); every token with probability ``>= t`` is kept, so tokens tied with the
last one needed are all kept. ``top_p = 1`` keeps every token.
"""

from __future__ import annotations

import torch

__all__ = ["steer_logits"]  # gathered by fastalign.ops.reference


def steer_logits(value_logits, base_logits, negative_logits=None, *, alpha=1.0, betas=None, top_p=1.0,
                 min_tokens_to_keep=1, temperature=1.0):
    with torch.no_grad():
        zv = value_logits.float()
        zb = base_logits.float()
        z = zv + alpha * (zv - zb)
        num_neg = 0 if negative_logits is None else negative_logits.shape[0]
        if num_neg:
            betas = torch.ones(num_neg) if betas is None else betas
            betas = torch.as_tensor(betas, dtype=torch.float32, device=zv.device)
            for j in range(num_neg):
                z = z - betas[j] * (negative_logits[j].float() - zb)
        z = z / temperature
        if top_p >= 1.0 or zv.shape[-1] == 0:
            return z
        p = torch.softmax(zv / temperature, dim=-1)
        sorted_p = p.sort(dim=-1, descending=True).values
        cumulative = sorted_p.cumsum(dim=-1)
        # First rank whose cumulative mass reaches top_p (cumsum of non-negatives never decreases).
        rank = (cumulative < top_p).sum(dim=-1, keepdim=True)
        rank = rank.clamp(min=min_tokens_to_keep - 1, max=zv.shape[-1] - 1)
        threshold = sorted_p.gather(-1, rank)
        return z.masked_fill(p < threshold, float("-inf"))
