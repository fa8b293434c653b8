"""Reward sources for the online flows (GRPO, PPO, in-context alignment), one small API.

A source is named by a string:

* ``"verifier"`` — the built-in task's programmatic verifier, picked per row by its ``task`` column
  (:mod:`fastalign.data.tasks`; e.g. arith exact match, pronoun neutral rate).
* a folder holding a trained reward model (a ``fastalign reward`` run's ``model/``): the scalar it gives
  prompt + completion tokens.
* ``"module:function"`` — a user function, called once per batch as TRL calls reward functions:
  ``function(prompts=[...], completions=[...], **columns)`` with every other row column as a keyword list
  (e.g. ``answer=[...]``), returning one number per completion.

:func:`build_rewards` turns a list of names (and optional weights, default 1 each) into a
:class:`Rewards` whose ``score(rows, completions)`` returns the weighted sum per completion and each
source's own scores. A function that raises, returns the wrong count, or gives NaN/Inf/None stops with
:class:`RewardError` naming the source and the prompt (row index and text) that failed.

    rewards = build_rewards(["verifier", "my_pkg.rewards:length_penalty"], weights=[1.0, 0.1], tokenizer=tok)
    total, parts = rewards.score(rows, completions)   # total: float32 [N]; parts: {name: float32 [N]}
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from fastalign.data import loading, tasks

VERIFIER = "verifier"


class RewardError(ValueError):
    """A reward source failed or gave a non-finite reward; the message names the source and the prompt."""


def _prompt_text(row) -> str:
    prompt = row.get("prompt", "")
    return (prompt if isinstance(prompt, str) else str(prompt))[:80]


def _check(name, values, rows) -> list[float]:
    if not isinstance(values, (list, tuple)) and not (isinstance(values, torch.Tensor) and values.dim() == 1):
        raise RewardError(f"reward {name!r} must return a list of numbers (one per completion), "
                          f"got {type(values).__name__}")
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if len(values) != len(rows):
        raise RewardError(f"reward {name!r} must return {len(rows)} numbers (one per completion), got {len(values)}")
    out = []
    for i, x in enumerate(values):
        try:
            x = float(x)
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x):
            raise RewardError(f"reward {name!r} gave {values[i]!r} for prompt {i} ({_prompt_text(rows[i])!r}); "
                              "rewards must be finite numbers")
        out.append(x)
    return out


class VerifierReward:
    """The built-in task verifiers, by each row's ``task`` column."""

    name = VERIFIER

    def __call__(self, rows, completions, completion_ids=None):
        out = []
        for i, (row, text) in enumerate(zip(rows, completions)):
            task = row.get("task")
            if task not in tasks.TASKS:
                raise RewardError(f"reward 'verifier' needs rows of a built-in task ({sorted(tasks.TASKS)}); "
                                  f"prompt {i} ({_prompt_text(row)!r}) has task {task!r}")
            out.append(tasks.get_task(task).reward(row, text))
        return out


class FunctionReward:
    """A user function ``function(prompts, completions, **columns) -> numbers``, from ``"module:function"``."""

    def __init__(self, spec: str, function: Callable | None = None):
        self.name = spec
        if function is None:
            module, _, attr = spec.partition(":")
            try:
                function = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ValueError(f"reward {spec!r}: could not import {attr!r} from module {module!r} "
                                 f"({type(e).__name__}: {e})") from None
            if not callable(function):
                raise ValueError(f"reward {spec!r} must name a function, got {type(function).__name__}")
        self.function = function

    def _call(self, rows, completions):
        columns = {k: [r.get(k) for r in rows] for k in sorted({k for r in rows for k in r}) if k != "prompt"}
        return self.function(prompts=[r.get("prompt") for r in rows], completions=list(completions), **columns)

    def __call__(self, rows, completions, completion_ids=None):
        try:
            values = self._call(rows, completions)
        except Exception as batch_error:  # a user function may raise anything: find the prompt that breaks it
            for i, (row, text) in enumerate(zip(rows, completions)):
                try:
                    self._call([row], [text])
                except Exception as e:
                    raise RewardError(f"reward {self.name!r} raised {type(e).__name__}: {e} on prompt {i} "
                                      f"({_prompt_text(row)!r})") from e
            raise RewardError(f"reward {self.name!r} raised {type(batch_error).__name__}: {batch_error} on the "
                              f"batch of {len(rows)} prompts (each prompt alone succeeds)") from batch_error
        return values


class ModelReward:
    """A trained reward model (:class:`fastalign.models.heads.ScalarHeadModel` folder) scoring prompt + completion
    tokens, EOS included, the format it was trained on."""

    def __init__(self, folder, tokenizer, *, device="cpu", dtype="float32", batch_size=64):
        from fastalign.models.heads import ScalarHeadModel

        if tokenizer is None:
            raise ValueError(f"reward model {str(folder)!r} needs the policy's tokenizer, got None")
        self.name = str(folder)
        self.model = ScalarHeadModel.load(folder, dtype=dtype).to(device).eval().requires_grad_(False)
        self.tokenizer, self.device, self.batch_size = tokenizer, torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, rows, completions, completion_ids=None):
        if completion_ids is None:
            eos = self.tokenizer.eos_token_id
            completion_ids = [loading.encode_completion(self.tokenizer, c) if c else ([eos] if eos is not None else [])
                              for c in completions]
        examples = []
        for row, ids in zip(rows, completion_ids):
            p = loading.encode_prompt(self.tokenizer, row["prompt"])
            examples.append({"input_ids": p + list(ids), "labels": [loading.IGNORE_INDEX] * (len(p) + len(ids))})
        out = []
        for start in range(0, len(examples), self.batch_size):
            batch = loading.collate(examples[start:start + self.batch_size], self.tokenizer.pad_token_id)
            out += self.model(batch.input_ids.to(self.device), batch.attention_mask.to(self.device)).tolist()
        return out


def reward_source(spec: str, *, tokenizer=None, device="cpu", dtype="float32"):
    """One source from its name (see the module docstring)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a reward must be 'verifier', a reward model folder or 'module:function', got {spec!r}")
    if spec == VERIFIER:
        return VerifierReward()
    if os.path.isdir(spec):
        return ModelReward(spec, tokenizer, device=device, dtype=dtype)
    if ":" in spec and all(part.strip() for part in spec.split(":", 1)):
        return FunctionReward(spec)
    raise ValueError(f"reward {spec!r} is neither 'verifier', an existing reward model folder, nor 'module:function'")


@dataclass
class Rewards:
    """Weighted reward sources; ``score`` gives the weighted sum and each source's scores."""

    sources: list
    weights: list

    def score(self, rows, completions, completion_ids=None):
        """``(total float32 [N], {source name: float32 [N]})`` for prompt rows and their decoded completions
        (``completion_ids`` — the token lists, EOS kept — spare a reward model from re-encoding them)."""
        if len(rows) != len(completions):
            raise ValueError(f"completions must have one entry per row ({len(rows)}), got {len(completions)}")
        parts = {}
        total = torch.zeros(len(rows), dtype=torch.float32)
        for source, weight in zip(self.sources, self.weights):
            values = torch.tensor(_check(source.name, source(rows, completions, completion_ids), rows),
                                  dtype=torch.float32)
            parts[source.name] = values
            total += weight * values
        return total, parts


def build_rewards(specs, weights=None, *, tokenizer=None, device="cpu", dtype="float32") -> Rewards:
    """:class:`Rewards` from source names (``"verifier"``, a reward model folder, ``"module:function"``) and
    optional weights (default 1.0 each). A callable may be given in place of a name."""
    specs = [specs] if isinstance(specs, str) else list(specs or [])
    if not specs:
        raise ValueError("rewards must name at least one source ('verifier', a reward model folder or "
                         "'module:function'), got none")
    weights = [1.0] * len(specs) if not weights else [float(w) for w in weights]
    if len(weights) != len(specs):
        raise ValueError(f"reward_weights must have one weight per reward ({len(specs)}), got {len(weights)}")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"reward_weights must be finite, got {weights}")
    sources = [FunctionReward(getattr(s, "__name__", repr(s)), s) if callable(s) else
               reward_source(s, tokenizer=tokenizer, device=device, dtype=dtype) for s in specs]
    return Rewards(sources, weights)
