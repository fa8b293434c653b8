"""The judge every ICL mode is measured by: a built-in verifier, a reward model, or a Python function.

``resolve_judge(spec, dataset, tokenizer)``:

* ``""`` — the built-in verifier of each row's task (``row["task"]``, else the dataset's only task);
  for ``pronoun`` the reward is 1 for the neutral "their", 0 otherwise.
* a folder holding a reward model (``scalar_head.safetensors``, as ``fastalign reward`` saves it) —
  the scalar score of the ORIGINAL prompt + completion (never the instruction-conditioned prompt:
  the judge must not see the intervention it measures).
* ``"module:function"`` — ``function(prompts=[...], completions=[...], **columns) -> list[float]``
  (TRL's reward-function convention: extra row columns arrive as keyword lists).

A judge call never crashes a sweep: a function that raises is retried one row at a time to find the
rows that fail, a NaN/Inf score counts as a failure, and each failure is reported with its prompt
index and text. Failed rows are left out of the means (their count is reported beside them).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path

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


def resolve_judge(spec: str, dataset: str, tokenizer=None, *, device=None, batch_size: int = 64) -> Judge:
    """The :class:`Judge` named by ``spec`` (see the module docstring)."""
    if not isinstance(spec, str):
        raise TypeError(f"judge must be a string ('', a reward-model folder or 'module:function'), got "
                        f"{type(spec).__name__}")
    if spec == "":
        names = tasks.parse_task_spec(dataset)
        if not names:
            raise ValueError(f"judge '' means the built-in verifier, but dataset {dataset!r} is not a built-in task "
                             f"({sorted(tasks.TASKS)}); pass judge=<reward-model folder> or judge=module:function")
        return Judge("verifier", _verifier_fn(names))
    if Path(spec).is_dir():
        return Judge(f"reward-model {spec}", _reward_model_fn(spec, tokenizer, device, batch_size))
    if ":" in spec:
        module_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"judge {spec!r}: could not import function {fn_name!r} from module {module_name!r} "
                             f"({type(e).__name__}: {e})") from e
        if not callable(fn):
            raise TypeError(f"judge {spec!r} must name a callable, got {type(fn).__name__}")
        return Judge(spec, _function_fn(fn))
    raise ValueError(f"judge must be '' (built-in verifier), a reward-model folder or 'module:function', got {spec!r}")


def _verifier_fn(names):
    verifiers = {n: tasks.get_task(n) for n in names}

    def score(prompts, completions, rows):
        out = []
        for row, completion in zip(rows, completions):
            name = row.get("task", names[0] if len(names) == 1 else None)
            if name not in verifiers:
                raise ValueError(f"row has task {name!r}; the verifier knows {sorted(verifiers)}")
            out.append(verifiers[name].reward(row, completion))
        return out

    return score


def _function_fn(fn):
    def score(prompts, completions, rows):
        columns = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt", "completion")}
        return fn(prompts=prompts, completions=completions, **columns)

    return score


def _reward_model_fn(folder, tokenizer, device, batch_size):
    import torch

    from fastalign.data import loading
    from fastalign.models.heads import ScalarHeadModel

    model = ScalarHeadModel.load(folder, device=device).eval()
    if tokenizer is None:
        from fastalign.models.loading import load_tokenizer

        tokenizer = load_tokenizer(folder)

    @torch.no_grad()
    def score(prompts, completions, rows):
        out = []
        for start in range(0, len(prompts), batch_size):
            seqs = [loading.encode_prompt(tokenizer, p) + loading.encode_completion(tokenizer, c)
                    for p, c in zip(prompts[start:start + batch_size], completions[start:start + batch_size])]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(seqs):  # right padding: the head reads the last real token
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            dev = next(model.parameters()).device
            out += model(ids.to(dev), mask.to(dev)).tolist()
        return out

    return score
