"""PICLe demonstration selection (Choi & Li, ICML 2024) and the two baselines it is compared with.

PICLe views the model as a mixture of personas. ``p_target`` is the base model briefly LoRA-tuned on
statements of the target persona; each candidate demonstration ``x`` is scored by the likelihood
ratio ``log p_target(x) − log p_base(x)`` (how much more the target persona explains it than the
base model does), and the top-K candidates are prepended to every query. Baselines: K random
candidates per query, and the K candidates most similar to the query (cosine of the base model's
mean-pooled final hidden states).
"""

from __future__ import annotations

import copy
import random

import torch

from fastalign import ops
from fastalign.data import loading
from fastalign.models.heads import CausalLMLogprobs, decoder, target_mask
from fastalign.models.loading import apply_lora


def lora_tune(lm, tokenizer, statements, *, r: int, alpha: float, lr: float, steps: int, batch_size: int,
              seed: int):
    """A LoRA-tuned copy of ``lm`` (next-token loss on every token of each statement); ``lm`` is untouched."""
    if not statements:
        raise ValueError("statements must hold at least one target-value statement, got none")
    tuned = apply_lora(copy.deepcopy(lm), r=r, alpha=alpha, dropout=0.0,
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    tuned.train()
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    encoded = [_text_ids(tokenizer, s) for s in statements]
    rng = random.Random(seed)
    device = next(tuned.parameters()).device
    losses = []
    for _ in range(steps):
        batch = [encoded[rng.randrange(len(encoded))] for _ in range(batch_size)]
        ids, mask = _right_pad(batch, tokenizer.pad_token_id)
        labels = ids.masked_fill(mask == 0, loading.IGNORE_INDEX)
        loss = tuned(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tuned.eval()
    return tuned, losses


@torch.no_grad()
def text_logprobs(lm, tokenizer, texts, *, batch_size: int = 64) -> torch.Tensor:
    """``[N]`` float64: ``log p(text)`` summed over the text's tokens after BOS (streamed: no ``T × V`` logits)."""
    model = CausalLMLogprobs(lm).eval()
    device = next(lm.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = _right_pad([_text_ids(tokenizer, t) for t in texts[start:start + batch_size]],
                               tokenizer.pad_token_id)
        labels = ids.masked_fill(mask == 0, loading.IGNORE_INDEX).to(device)
        logp = model(ids.to(device), mask.to(device), labels)
        out.append(ops.sequence_logprobs(logp, target_mask(labels)).double().cpu())
    return torch.cat(out)


@torch.no_grad()
def embeddings(lm, tokenizer, texts, *, batch_size: int = 64) -> torch.Tensor:
    """``[N, H]`` unit vectors: the mean of the final hidden states over each text's tokens."""
    device = next(lm.parameters()).device
    trunk = decoder(lm)
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = _right_pad([_text_ids(tokenizer, t) for t in texts[start:start + batch_size]],
                               tokenizer.pad_token_id)
        hidden = trunk(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        m = mask.to(device).unsqueeze(-1).to(hidden.dtype)
        out.append(torch.nn.functional.normalize(((hidden * m).sum(1) / m.sum(1)).float(), dim=-1).cpu())
    return torch.cat(out)


def likelihood_ratio_top_k(target_lp: torch.Tensor, base_lp: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` candidates with the largest ``log p_target − log p_base`` (ties: lower index)."""
    ratio = (target_lp - base_lp).tolist()
    return sorted(range(len(ratio)), key=lambda i: (-ratio[i], i))[:k]


def similar_top_k(query_emb: torch.Tensor, pool_emb: torch.Tensor, k: int) -> list[list[int]]:
    """Per query, the ``k`` pool indices with the highest cosine similarity."""
    return (query_emb @ pool_emb.T).topk(min(k, pool_emb.shape[0]), dim=-1).indices.tolist()


def random_k(num_queries: int, pool_size: int, k: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [rng.sample(range(pool_size), min(k, pool_size)) for _ in range(num_queries)]


def _text_ids(tokenizer, text):
    return loading.encode_prompt(tokenizer, text)


def _right_pad(seqs, pad_id):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask
