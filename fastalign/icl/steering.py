"""Steered decoding: several prompt branches of each prompt decoded together, one forward per step.

A prompt is decoded under R branches: the value-conditioned prompt, the plain prompt and K contrary
prompts. The R × B branch prompts are rows of ONE left-padded batch, so every branch keeps its own
KV cache rows and positions, and each decoding step is a single forward over all branches. The
next-token logits of the branches are combined by :func:`fastalign.ops.steer_logits`
(``z = z_v + α(z_v − z_base) − Σ_j β_j (z_neg_j − z_base)`` with the top-p plausibility mask of the
value-conditioned distribution), one token is chosen per prompt, and that same token is appended to
every branch of the prompt: the branches differ only in their prompts.

With a single branch (R = 1) the same loop is plain decoding of that prompt, which is what the
steering cost is measured against.
"""

from __future__ import annotations

import torch

from fastalign import ops
from fastalign.engine.generation import preallocated_cache
from fastalign.models.loading import cache_argument


def _left_pad(prompts, pad_id):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask


def _check_branches(branch_prompts):
    if not isinstance(branch_prompts, (list, tuple)) or not branch_prompts:
        raise ValueError(f"branch_prompts must be a non-empty list of branches (value, base, contrary...), got "
                         f"{type(branch_prompts).__name__}")
    n = len(branch_prompts[0])
    for r, branch in enumerate(branch_prompts):
        if len(branch) != n:
            raise ValueError(f"branch_prompts[{r}] must hold one prompt per prompt of branch 0 ({n}), "
                             f"got {len(branch)}")
        for i, p in enumerate(branch):
            if not p:
                raise ValueError(f"branch_prompts[{r}][{i}] must be a non-empty list of token ids, got {p!r}")
    return n


@torch.no_grad()
def steered_generate(lm, branch_prompts, *, pad_id: int, eos_id: int | None, max_new_tokens: int, alpha: float = 1.0,
                     betas=None, top_p: float = 1.0, temperature: float = 0.0, generator=None, batch_size: int = 64):
    """Decode each prompt under its branches; returns one completion (token-id list) per prompt.

    ``branch_prompts`` is ``[value, base, contrary_1, ..., contrary_K]``, each a list of B prompts
    (token-id lists), or ``[prompts]`` alone for plain decoding. Greedy when ``temperature == 0``
    (the top-p mask is then taken from ``softmax(z_v)``), else sampled from the steered
    distribution at that temperature with ``generator``. ``batch_size`` counts prompts: a forward
    holds ``R × batch_size`` rows. Completions are cut after the first EOS (kept).
    """
    n = _check_branches(branch_prompts)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    num_branches = len(branch_prompts)
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    cache_kw = cache_argument(lm)
    out = []
    for start in range(0, n, batch_size):
        rows = [p for branch in branch_prompts for p in branch[start:start + batch_size]]  # branch-major
        out += _decode_chunk(lm, rows, num_branches, cache_kw, device, pad_id=pad_id, eos_id=eos_id,
                             max_new_tokens=max_new_tokens, alpha=alpha, betas=betas, top_p=top_p,
                             temperature=temperature, generator=generator)
    lm.train(was_training)
    return out


def _decode_chunk(lm, rows, num_branches, cache_kw, device, *, pad_id, eos_id, max_new_tokens, alpha, betas, top_p,
                  temperature, generator):
    ids, mask = _left_pad(rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    b = len(rows) // num_branches
    done = torch.zeros(b, dtype=torch.bool, device=device)
    tokens = []
    step_ids = ids
    cache = preallocated_cache(lm, ids.shape[1] + max_new_tokens)
    cache_position = torch.arange(ids.shape[1], device=device)
    for _ in range(max_new_tokens):
        output = lm(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                    cache_position=cache_position, **{cache_kw: cache})
        cache = output["cache"] if "cache" in output else output["past_key_values"]
        cache_position = cache_position[-1:] + 1
        logits = output.logits[:, -1, :].view(num_branches, b, -1)
        next_token = _choose(logits, alpha=alpha, betas=betas, top_p=top_p, temperature=temperature,
                             generator=generator)
        if pad_id is not None:
            next_token = next_token.masked_fill(done, pad_id)
        tokens.append(next_token)
        if eos_id is not None:
            done |= next_token == eos_id
        if bool(done.all()):
            break
        # The chosen token extends every branch of its prompt: branch-major rows repeat the [B] tokens R times.
        step_ids = next_token.repeat(num_branches).unsqueeze(1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
    completions = []
    for row in torch.stack(tokens, dim=1).tolist():
        cut = row.index(eos_id) + 1 if eos_id is not None and eos_id in row else len(row)
        completions.append([t for t in row[:cut] if t != pad_id or t == eos_id])
    return completions


def _choose(logits, *, alpha, betas, top_p, temperature, generator):
    """One token per prompt from the ``[R, B, V]`` branch logits."""
    if logits.shape[0] == 1:
        scores = logits[0].float()
        if temperature > 0:
            scores = scores / temperature
    else:
        negatives = logits[2:] if logits.shape[0] > 2 else None
        scores = ops.steer_logits(logits[0], logits[1], negatives, alpha=alpha, betas=betas, top_p=top_p,
                                  temperature=temperature if temperature > 0 else 1.0)
    if temperature == 0:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
