"""``task-diversity``: instruction tuning on N task families × M examples at a fixed N·M, measured on families
never trained on, against N (the lecture's 1000 tasks × 50 vs 100 × 500, scaled down to the tiny model).

For each N, the first N families of a seeded shuffle of the training pool (:mod:`fastalign.data.families`;
nested: the N=64 mix holds the N=8 families) get ``budget // N`` rows each; the SFT flow trains the tiny model
from its initial weights on them (a JSONL file in the seed's folder), the same steps and batch for every N.
Measured on the held-out families (new combinations of trained steps, :func:`families.heldout_family_names`):
greedy exact match and the mean NLL per answer token; and, for contrast, exact match on unseen inputs of the
families each model trained on.
"""

from __future__ import annotations

import json
import random

from fastalign.data import families, loading
from fastalign.engine.generation import decode, generate
from fastalign.models.loading import load_causal_lm, load_tokenizer

from .driver import fmt, line_plot, series

CLAIM = ("Instruction tuning benefits more from task diversity than from sample quantity: 50 examples of each of "
         "1,000 tasks beat 500 of each of 100, because the model learns to generalize across task types.")
SIZES = {
    # ~40 s of SFT per N on a quiet 2-core machine (rows are ~70 characters: ~6x an arith row).
    "default": dict(budget=1024, n_families=[4, 32, 256], eval_per_family=8, seen_eval_families=32,
                    sft=dict(max_steps=100, batch_size=32, micro_batch_size=16, lr=3e-3, warmup_steps=10,
                             min_lr_ratio=0.1)),
    "quick": dict(budget=16, n_families=[2, 8], eval_per_family=1, seen_eval_families=2, heldout_families=4,
                  sft=dict(max_steps=2, batch_size=8, micro_batch_size=8, lr=3e-3)),
}


def run_seed(run) -> dict:
    size = SIZES["quick" if run.quick else "default"]
    pool = families.training_family_names()
    random.Random(f"task-diversity-{run.seed}").shuffle(pool)
    heldout = families.heldout_family_names()[:size.get("heldout_families")]
    heldout_rows = families.mixture_rows(heldout, size["eval_per_family"], seed=run.seed, split="eval")
    tokenizer = load_tokenizer("tiny")
    out = {}
    for n in size["n_families"]:
        names = pool[:n]
        rows = families.mixture_rows(names, size["budget"] // n, seed=run.seed)
        data = run.dir / "data" / f"N{n}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        _, model_dir = run.flow("sft", f"sft_N{n}", dict(size["sft"], dataset=str(data), num_examples=len(rows)))
        lm = load_causal_lm(model_dir)
        seen_rows = families.mixture_rows(names[:size["seen_eval_families"]], size["eval_per_family"], seed=run.seed,
                                          split="eval")
        out[f"heldout_exact_match/N={n}"] = exact_match(lm, tokenizer, heldout_rows)
        out[f"heldout_nll/N={n}"] = answer_nll(lm, tokenizer, heldout_rows)
        out[f"seen_exact_match/N={n}"] = exact_match(lm, tokenizer, seen_rows)
        out[f"examples_per_family/N={n}"] = float(size["budget"] // n)
    return out


def exact_match(lm, tokenizer, rows) -> float:
    """Greedy completions checked by each row's family verifier."""
    ids = [loading.encode_prompt(tokenizer, r["prompt"]) for r in rows]
    longest = max(len(r["answer"]) for r in rows)
    done = decode(tokenizer, generate(lm, tokenizer, ids, max_new_tokens=longest + 1))
    return sum(families.get_family(r["family"]).verify(r, c) for r, c in zip(rows, done)) / len(rows)


def answer_nll(lm, tokenizer, rows) -> float:
    """Mean NLL per answer token (end-of-sequence included), as the SFT flow's held-out loss computes it."""
    from fastalign.flows.sft import heldout_loss

    return heldout_loss(lm, tokenizer, rows, max_length=256)


def plot(results, root) -> list:
    panels = {"exact match (greedy)": {"held-out families": "heldout_exact_match",
                                       "trained families, new inputs": "seen_exact_match"},
              "held-out families: NLL per answer token (lower is better)": {"held-out families": "heldout_nll"}}
    budget = int(series(results, "examples_per_family")[0][1] * series(results, "examples_per_family")[0][0])
    return [line_plot(root / "task_diversity.png", panels, results, xlabel="N task families (M = budget / N)",
                      title=f"SFT on N families x M examples, N*M = {budget}", logx=True)]


def findings(results) -> list:
    held, nll, seen = (series(results, m) for m in ("heldout_exact_match", "heldout_nll", "seen_exact_match"))
    (n_lo, *_), (n_hi, *_) = held[0], held[-1]
    lines = ["held-out family exact match: " + ", ".join(f"N={x:g}: {fmt(m, s)}" for x, m, s, _ in held),
             "held-out family NLL per answer token: " + ", ".join(f"N={x:g}: {fmt(m, s)}" for x, m, s, _ in nll),
             "trained families, new inputs, exact match: " + ", ".join(f"N={x:g}: {fmt(m, s)}" for x, m, s, _ in seen)]
    better_nll = nll[-1][1] < nll[0][1] and all(v_hi < v_lo for v_lo, v_hi in zip(nll[0][3], nll[-1][3]))
    lines.append(f"N={n_hi:g} vs N={n_lo:g} on held-out families: NLL "
                 + ("lower on every seed (more diverse is better)" if better_nll else "not lower on every seed")
                 + f"; exact match {held[-1][1] - held[0][1]:+.3f}")
    return lines
