"""Batched generation from prompts (left-padded) with a KV cache, for evaluation and rollouts."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, tokenizer, prompt_ids, *, max_new_tokens, temperature=0.0, batch_size=256, generator=None):
    """Complete each prompt (a list of token ids); greedy when ``temperature == 0``.

    Returns a list of completion token-id lists, cut after the first EOS (EOS kept).
    """
    from transformers import GenerationConfig

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=pad,
                              eos_token_id=eos, temperature=temperature if temperature > 0 else None,
                              top_k=None, top_p=None)
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        if generator is not None and temperature > 0:
            # HF sampling draws from the global RNG: seed it from the caller's generator for repeatability.
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for row in seqs[:, width:].tolist():
            cut = row.index(eos) + 1 if eos in row else len(row)
            out.append([t for t in row[:cut] if t != pad or t == eos])
    model.train(was_training)
    return out


def decode(tokenizer, completions):
    return [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
