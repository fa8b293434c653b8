"""The judge every ICL mode is measured by: a built-in verifier, a reward model, or a Python function.

``resolve_judge(spec, dataset, tokenizer)``:

* ``""`` (or ``"verifier"``) — the built-in verifier of each row's task (``row["task"]``); for
  ``pronoun`` the reward is 1 for the neutral "their", 0 otherwise.
* a folder holding a reward model (``scalar_head.safetensors``, as ``fastalign reward`` saves it) —
  the scalar score of the ORIGINAL prompt + completion (never the instruction-conditioned prompt:
  the judge must not see the intervention it measures).
* ``"module:function"`` — ``function(prompts=[...], completions=[...], **columns) -> list[float]``
  (TRL's reward-function convention: extra row columns arrive as keyword lists).

The sources are :mod:`fastalign.rewards`' (shared with GRPO/PPO); this module adds what a sweep needs on
top of them. A judge call never crashes a sweep: a function that raises is retried one row at a time to find the
rows that fail, a NaN/Inf score counts as a failure, and each failure is reported with its prompt
index and text. Failed rows are left out of the means (their count is reported beside them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fastalign.data import tasks


@dataclass
class JudgeScores:
    """Per-row rewards (None where the judge failed) and one record per failure."""

    rewards: list
    failures: list = field(default_factory=list)

    def mean(self) -> float | None:
        ok = [r for r in self.rewards if r is not None]
        return sum(ok) / len(ok) if ok else None


class Judge:
    """``judge.score(rows, completions) -> JudgeScores``; rows carry ``prompt`` (+ what the judge needs)."""

    def __init__(self, name: str, batch_fn):
        self.name = name
        self._batch_fn = batch_fn  # (prompts, completions, rows) -> list of floats

    def score(self, rows, completions, *, what: str = "") -> JudgeScores:
        if len(rows) != len(completions):
            raise ValueError(f"completions must hold one entry per row ({len(rows)}), got {len(completions)}")
        if not rows:
            return JudgeScores([])
        prompts = [r["prompt"] for r in rows]
        try:
            values = list(self._batch_fn(prompts, completions, rows))
            if len(values) != len(rows):
                raise ValueError(f"returned {len(values)} scores for {len(rows)} completions")
        except Exception:  # find which rows fail: the batch error alone does not say
            values = []
            for i in range(len(rows)):
                try:
                    out = list(self._batch_fn(prompts[i:i + 1], completions[i:i + 1], rows[i:i + 1]))
                    values.append(out[0] if len(out) == 1 else _Failure(f"returned {len(out)} scores for 1"))
                except Exception as e:  # a user function may raise anything
                    values.append(_Failure(f"{type(e).__name__}: {e}"))
        rewards, failures = [], []
        for i, value in enumerate(values):
            reason = value.reason if isinstance(value, _Failure) else _bad_number(value)
            if reason:
                failures.append({"index": i, "prompt": _text(prompts[i]), "completion": completions[i],
                                 "error": reason})
                rewards.append(None)
            else:
                rewards.append(float(value))
        for f in failures[:5]:
            print(f"judge {self.name}{' (' + what + ')' if what else ''}: prompt {f['index']} "
                  f"{f['prompt'][:60]!r} failed: {f['error']}")
        if len(failures) > 5:
            print(f"judge {self.name}: ... {len(failures) - 5} more failures")
        return JudgeScores(rewards, failures)


class _Failure:
    def __init__(self, reason):
        self.reason = reason


def _bad_number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        return f"returned {type(value).__name__} {value!r}, expected a number"
    if not math.isfinite(float(value)):
        return f"returned {float(value)}"
    return ""


def _text(prompt) -> str:
    return prompt if isinstance(prompt, str) else " | ".join(str(m.get("content", "")) for m in prompt)


def resolve_judge(spec: str, dataset: str, tokenizer=None, *, device=None) -> Judge:
    """The :class:`Judge` named by ``spec`` (see the module docstring); sources come from :mod:`fastalign.rewards`."""
    from fastalign import rewards

    if not isinstance(spec, str):
        raise TypeError(f"judge must be a string ('', a reward-model folder or 'module:function'), got "
                        f"{type(spec).__name__}")
    if spec in ("", rewards.VERIFIER) and not tasks.parse_task_spec(dataset):
        raise ValueError(f"judge {spec!r} means the built-in verifier, but dataset {dataset!r} is not a built-in task "
                         f"({sorted(tasks.TASKS)}); pass judge=<reward-model folder> or judge=module:function")
    source = rewards.reward_source(spec or rewards.VERIFIER, tokenizer=tokenizer, device=device or "cpu")
    return Judge(spec or rewards.VERIFIER, lambda prompts, completions, rows: source(rows, completions))
