"""``selection`` (capacity vs capability): pass@k for k = 1…64 of the SFT model and of its aligned descendants.

The pipeline's stages, with the pipeline's configs (:data:`fastalign.pipeline.DEFAULTS`): SFT on
``arith_slips*15+pronoun``, then from the SFT model GRPO on ``arith`` (the verifier's reward) and DPO on ``pronoun``
(neutral "their" chosen over the stereotype). Each model samples ``samples`` completions (temperature 1) of each
held-out prompt; pass@k is the unbiased estimate (Chen et al.) of "at least one of k samples is right": arith
exact match for SFT and GRPO, the neutral "their" for SFT and DPO. If alignment only teaches *selection* among
what the model can already produce, pass@1 rises toward the SFT model's pass@64 while pass@64 does not rise.
"""

from __future__ import annotations

import torch

from fastalign.data import loading, tasks
from fastalign.engine.generation import decode, sample
from fastalign.models.loading import load_causal_lm, load_tokenizer

from .driver import fmt, line_plot, pass_at_k, series

CLAIM = ("Models have the capacity (knowledge) to behave appropriately but lack the capability to do it "
         "consistently: alignment tuning teaches selection among responses the model can already produce, "
         "not new knowledge.")
KS = (1, 2, 4, 8, 16, 32, 64)
SIZES = {
    "default": dict(prompts=100, samples=64),
    "quick": dict(prompts=4, samples=4),
}
# (metric, task, the check of one completion): what pass@k counts for each task
CHECKS = {"arith": ("pass_arith", lambda task, row, text: task.reward(row, text) == 1.0),
          "pronoun": ("pass_neutral", lambda task, row, text: task.classify(row, text) == "neutral")}


def run_seed(run) -> dict:
    size = SIZES["quick" if run.quick else "default"]
    _, sft_dir = run.pipeline_stage("sft")
    _, grpo_dir = run.pipeline_stage("grpo", init_from=sft_dir)
    _, dpo_dir = run.pipeline_stage("dpo", init_from=sft_dir)
    tokenizer = load_tokenizer("tiny")
    out = {}
    for model, folder, task_names in (("sft", sft_dir, ("arith", "pronoun")), ("grpo", grpo_dir, ("arith",)),
                                      ("dpo", dpo_dir, ("pronoun",))):
        lm = load_causal_lm(folder)
        for name in task_names:
            rates = pass_rates(lm, tokenizer, name, n_prompts=size["prompts"], samples=size["samples"], seed=run.seed)
            metric = CHECKS[name][0]
            out.update({f"{metric}_{model}/k={k}": v for k, v in rates.items()})
    return out


def pass_rates(lm, tokenizer, task_name, *, n_prompts, samples, seed) -> dict:
    """``{k: mean pass@k}`` over ``n_prompts`` held-out prompts of the task, from ``samples`` samples each."""
    task = tasks.get_task(task_name)
    _, check = CHECKS[task_name]
    rows = task.prompts(n_prompts, seed=seed, split="eval")
    ids = [loading.encode_prompt(tokenizer, r["prompt"]) for r in rows]
    rollout = sample(lm, tokenizer, ids, max_new_tokens=task.max_new_tokens, temperature=1.0, num_samples=samples,
                     generator=torch.Generator().manual_seed(seed))
    texts = decode(tokenizer, rollout.completions())
    correct = [0] * len(rows)
    for i, text in zip(rollout.prompt_index.tolist(), texts):
        correct[i] += check(task, rows[i], text)
    return {k: sum(pass_at_k(samples, c, k) for c in correct) / len(rows) for k in KS if k <= samples}


def plot(results, root) -> list:
    panels = {"arith exact match: pass@k": {"SFT": "pass_arith_sft", "GRPO (from SFT)": "pass_arith_grpo"},
              "neutral 'their': pass@k": {"SFT": "pass_neutral_sft", "DPO (from SFT)": "pass_neutral_dpo"}}
    return [line_plot(root / "selection.png", panels, results, xlabel="k (samples at temperature 1)",
                      title="pass@k of the SFT model and its aligned descendants", logx=True)]


def findings(results) -> list:
    lines = []
    for task, base, tuned, name in (("arith", "pass_arith_sft", "pass_arith_grpo", "GRPO"),
                                    ("pronoun", "pass_neutral_sft", "pass_neutral_dpo", "DPO")):
        b, t = series(results, base), series(results, tuned)
        top_k = int(b[-1][0])
        lines.append(f"{task}: SFT pass@1 {fmt(b[0][1], b[0][2])}, pass@{top_k} {fmt(b[-1][1], b[-1][2])}; {name} "
                     f"pass@1 {fmt(t[0][1], t[0][2])}, pass@{top_k} {fmt(t[-1][1], t[-1][2])}")
        gap = b[-1][1] - b[0][1]
        moved = (t[0][1] - b[0][1]) / gap if gap > 0 else float("nan")
        lines.append(f"{task}: {name} closes {moved:.0%} of the SFT model's pass@1→pass@{top_k} gap; its pass@{top_k} "
                     f"changes by {t[-1][1] - b[-1][1]:+.3f}")
    return lines
