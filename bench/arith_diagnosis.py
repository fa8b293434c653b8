"""Why GRPO on ``arith`` learns on some seeds and machines and not on others (issue 17).

``probe MODEL...``: on 200 held-out ``arith`` prompts (eval split, seed 0), the greedy exact match, how often
the greedy answer's units digit and its leading digits are right, and, over 8 samples per prompt at
temperature 1 (GRPO's sampling), the mean exact match and pass@8. A units digit at chance (~0.1) with right
leading digits is the SFT plateau: GRPO then sees a 1-in-10 reward per sample on a rule it has never produced.

``carry-drop SEED FRACTION OUT.jsonl``: the pipeline's SFT rows (``arith*15+pronoun``, 600 per unit, ``SEED``)
with the carry dropped (answer a+b-10) in ``FRACTION`` of the arith rows whose units digits carry: a
demonstrator with a systematic bug, so a model that has learned the digits still answers carry problems wrong
at greedy decoding while sampling the right answer often, which the verifier reward can then lift.

Run: ``python bench/arith_diagnosis.py probe runs/sft/model``.
"""

from __future__ import annotations

import json
import random
import sys

import torch

from fastalign.data import loading, tasks
from fastalign.engine.generation import decode, generate
from fastalign.models.loading import load_causal_lm, load_tokenizer

SAMPLES = 8


def first_answer(completion: str) -> str:
    return completion.split("\n")[0].split("</s>")[0].strip()


def probe(model_dir: str, n: int = 200) -> dict:
    tokenizer, lm = load_tokenizer("tiny"), load_causal_lm(model_dir)
    rows = tasks.get_task("arith").prompts(n, seed=0, split="eval")
    ids = [loading.encode_prompt(tokenizer, r["prompt"]) for r in rows]
    greedy = [first_answer(c) for c in decode(tokenizer, generate(lm, tokenizer, ids, max_new_tokens=5,
                                                                  batch_size=256))]
    sampled = decode(tokenizer, generate(lm, tokenizer, ids * SAMPLES, max_new_tokens=5, temperature=1.0,
                                         batch_size=256, generator=torch.Generator().manual_seed(0)))
    hits = [first_answer(c) == rows[i % n]["answer"] for i, c in enumerate(sampled)]
    return {"greedy_exact_match": sum(g == r["answer"] for g, r in zip(greedy, rows)) / n,
            "greedy_units_digit": sum(g[-1:] == r["answer"][-1:] for g, r in zip(greedy, rows)) / n,
            "greedy_leading_digits": sum(g[:-1] == r["answer"][:-1] for g, r in zip(greedy, rows)) / n,
            "sampled_exact_match": sum(hits) / len(hits),
            f"pass@{SAMPLES}": sum(any(hits[i + k * n] for k in range(SAMPLES)) for i in range(n)) / n}


def carry_drop_rows(seed: int, fraction: float) -> list[dict]:
    rng = random.Random(f"carry-{seed}")
    out = []
    for r in tasks.task_rows("arith*15+pronoun", "sft", 600, seed=seed):
        if r["task"] == "arith":
            a, b = map(int, r["prompt"][:-1].split("+"))
            if a % 10 + b % 10 >= 10 and rng.random() < fraction:
                r = dict(r, completion=str(a + b - 10))
        out.append({"prompt": r["prompt"], "completion": r["completion"]})
    return out


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    if argv[:1] == ["probe"] and len(argv) > 1:
        for model_dir in argv[1:]:
            print(json.dumps({"model": model_dir, **probe(model_dir)}))
        return 0
    if argv[:1] == ["carry-drop"] and len(argv) == 4:
        seed, fraction, out = int(argv[1]), float(argv[2]), argv[3]
        if not 0 <= fraction <= 1:
            raise SystemExit(f"FRACTION must be in [0, 1], got {fraction}")
        with open(out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in carry_drop_rows(seed, fraction))
        return 0
    raise SystemExit("usage: arith_diagnosis.py probe MODEL... | carry-drop SEED FRACTION OUT.jsonl")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
