"""Held-out evaluation shared by the flows: task verifiers, KL to a reference model, preference accuracy."""

from __future__ import annotations

import torch

from fastalign import ops
from fastalign.data import loading, tasks
from fastalign.models.heads import CausalLMLogprobs, target_mask

from .generation import decode, generate


def task_metrics(lm, tokenizer, dataset: str, *, n: int, seed: int = 0, batch_size: int = 256) -> dict:
    """Greedy completions of each built-in task's held-out prompts, scored by its verifier.

    Returns ``{"arith/exact_match": ..., "pronoun/neutral_rate": ..., ...}``; empty for non-task datasets.
    """
    names = tasks.parse_task_spec(dataset) or []
    out = {}
    for name in names:
        task = tasks.get_task(name)
        rows = task.prompts(n, seed=seed, split="eval")
        ids = [loading.encode_prompt(tokenizer, r["prompt"]) for r in rows]
        completions = decode(tokenizer, generate(lm, tokenizer, ids, max_new_tokens=task.max_new_tokens,
                                                 batch_size=batch_size))
        out.update({f"{name}/{k}": v for k, v in task.score(rows, completions).items()})
    return out


@torch.no_grad()
def kl_to_reference(lm, ref_lm, tokenizer, prompts, *, max_new_tokens=8, seed=0, batch_size=256) -> float:
    """Monte-Carlo KL(policy ‖ reference) per completion: sample from the policy (temperature 1) and average
    ``Σ_t log π(y_t) − log π_ref(y_t)`` over the samples (an unbiased estimate of the sequence KL)."""
    ids = [loading.encode_prompt(tokenizer, p) for p in prompts]
    gen = torch.Generator().manual_seed(seed)
    completions = generate(lm, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=1.0, batch_size=batch_size,
                           generator=gen)
    examples = [{"input_ids": p + c, "labels": [loading.IGNORE_INDEX] * len(p) + c} for p, c in zip(ids, completions)
                if c]
    if not examples:
        return 0.0
    device = next(lm.parameters()).device
    policy, ref = CausalLMLogprobs(lm).eval(), CausalLMLogprobs(ref_lm).eval()
    total = 0.0
    for start in range(0, len(examples), batch_size):
        batch = loading.collate(examples[start:start + batch_size], tokenizer.pad_token_id).to(device)
        mask = target_mask(batch.labels)
        lp = policy(batch.input_ids, batch.attention_mask, batch.labels)
        lr = ref(batch.input_ids, batch.attention_mask, batch.labels)
        total += float(ops.sequence_logprobs(lp - lr, mask).sum())
    return total / len(examples)


@torch.no_grad()
def sequence_logps(lm, tokenizer, pairs, *, average=False, batch_size=128):
    """``(chosen [N], rejected [N])`` sequence log-probs of encoded preference pairs under ``lm``."""
    device = next(lm.parameters()).device
    model = CausalLMLogprobs(lm).eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = loading.collate_preferences(chunk, tokenizer.pad_token_id).to(device)
        seq = ops.sequence_logprobs(model(batch.input_ids, batch.attention_mask, batch.labels),
                                    target_mask(batch.labels), average=average)
        chosen.append(seq[:len(chunk)].cpu())
        rejected.append(seq[len(chunk):].cpu())
    return torch.cat(chosen), torch.cat(rejected)


def heldout_rows(cfg, kind: str):
    """Held-out rows: ``eval_dataset`` when set, else the built-in tasks' eval split, else None."""
    if cfg.eval_dataset:
        return loading.load_rows(cfg.eval_dataset, kind, n=cfg.num_eval_examples, seed=cfg.seed, split="test")
    if tasks.parse_task_spec(cfg.dataset):
        return loading.load_rows(cfg.dataset, kind, n=cfg.num_eval_examples, seed=cfg.seed, split="eval")
    return None


def policy_metrics(cfg, lm, tokenizer, start_lm, prompts) -> dict:
    """What every policy-training flow reports at the end: the task verifiers on held-out prompts
    (built-in tasks of ``cfg.dataset``) and the KL to the starting model on ``prompts`` (rows with a
    ``prompt``; skipped when None)."""
    out = task_metrics(lm, tokenizer, cfg.dataset, n=cfg.num_eval_examples, seed=cfg.seed,
                       batch_size=cfg.eval_batch_size)
    if prompts is not None:
        out["kl_to_start"] = kl_to_reference(lm, start_lm, tokenizer, [r["prompt"] for r in prompts], seed=cfg.seed,
                                             batch_size=cfg.eval_batch_size)
    return out


def online_policy_report(cfg, trained, tokenizer, start: str, device):
    """What the online flows (GRPO, PPO) report on held-out prompts: the trained policy's metrics against the
    model it started from, and that model's task verifiers keyed ``start/<metric>``, so one report holds
    before → after. Returns ``(metrics, start_lm, prompts)`` for the flow's own extra measurements."""
    from fastalign.models.loading import load_causal_lm

    start_lm = load_causal_lm(start, dtype=cfg.dtype, device=device)
    prompts = heldout_rows(cfg, "prompts")
    metrics = policy_metrics(cfg, trained, tokenizer, start_lm, prompts)
    start_tasks = task_metrics(start_lm, tokenizer, cfg.dataset, n=cfg.num_eval_examples, seed=cfg.seed,
                               batch_size=cfg.eval_batch_size)
    metrics.update({f"start/{k}": v for k, v in start_tasks.items()})
    return metrics, start_lm, prompts
