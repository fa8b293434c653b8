"""Why GRPO on ``arith`` learns on some seeds and machines and not on others (issue 17).

``probe MODEL...``: on 200 held-out ``arith`` prompts (eval split, seed 0), the greedy exact match, how often
the greedy answer's units digit and its leading digits are right, and, over 8 samples per prompt at
temperature 1 (GRPO's sampling), the mean exact match and pass@8. A units digit at chance (~0.1) with right
leading digits is the SFT plateau: GRPO then sees a 1-in-10 reward per sample on a rule it has never produced.

The carry-dropping demonstrator this diagnosis used (``carry-drop``, a JSONL of the SFT rows with the carry
dropped) became the built-in task ``arith_slips``, the pipeline's SFT data.

Run: ``python bench/arith_diagnosis.py probe runs/sft/model``.
"""

from __future__ import annotations

import json
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


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    if argv[:1] == ["probe"] and len(argv) > 1:
        for model_dir in argv[1:]:
            print(json.dumps({"model": model_dir, **probe(model_dir)}))
        return 0
    raise SystemExit("usage: arith_diagnosis.py probe MODEL...")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
