"""What the online flows (GRPO, PPO) share around a rollout: how long completions may be, the prompts' token
ids, the verifier's reward of each completion and the global means of rollout metrics over processes."""

from __future__ import annotations

import torch

from fastalign.data import loading, tasks
from fastalign.engine.distributed import DistState, all_reduce_sum

FILE_MAX_NEW_TOKENS = 16  # completion length for prompts that are not built-in tasks (when max_new_tokens = 0)


def max_new_tokens(cfg) -> int:
    """``cfg.max_new_tokens``, else the longest completion any built-in task of ``cfg.dataset`` needs, else
    :data:`FILE_MAX_NEW_TOKENS` for a file or hub dataset."""
    if cfg.max_new_tokens:
        return cfg.max_new_tokens
    names = tasks.parse_task_spec(cfg.dataset)
    return max(tasks.get_task(n).max_new_tokens for n in names) if names else FILE_MAX_NEW_TOKENS


def encode_prompts(tokenizer, rows, *, max_length: int, new_tokens: int) -> list[list[int]]:
    """Each row's prompt token ids, its last tokens kept so prompt + ``new_tokens`` fit in ``max_length``."""
    keep = max(max_length - new_tokens, 1)
    return [loading.encode_prompt(tokenizer, r["prompt"])[-keep:] for r in rows]


def verifier_rewards(rows, texts) -> list:
    """The built-in task verifier's reward of each completion text; None for rows that are not a task's."""
    return [tasks.get_task(r["task"]).reward(r, t) if r.get("task") in tasks.TASKS else None
            for r, t in zip(rows, texts)]


def global_means(sums: dict, counts: dict, state: DistState) -> dict:
    """``{key: Σ sums[key] / Σ counts[key]}`` over every process, in one all-reduce (every process passes the
    same keys in the same order); a key whose global count is 0 is left out on every process."""
    keys = list(sums)
    local = torch.tensor([float(v) for k in keys for v in (sums[k], counts[k])], dtype=torch.float64)
    totals = all_reduce_sum(local, state).view(-1, 2)
    return {k: float(s / n) for k, (s, n) in zip(keys, totals.tolist()) if n > 0}


def verifier_means(rows, rewards, state: DistState) -> dict:
    """``{"<task>/verifier_reward": mean}`` per built-in task over this rollout's rows on every process."""
    sums = {f"{name}/verifier_reward": 0.0 for name in sorted(tasks.TASKS)}
    counts = dict.fromkeys(sums, 0)
    for row, reward in zip(rows, rewards):
        if reward is not None:
            sums[f"{row['task']}/verifier_reward"] += reward
            counts[f"{row['task']}/verifier_reward"] += 1
    return global_means(sums, counts, state)
