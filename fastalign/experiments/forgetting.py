"""``forgetting``: the in-context flow's ``forgetting`` measurement over seeds.

The pipeline's SFT model (:data:`fastalign.pipeline.DEFAULTS`), then ``fastalign icl --mode forgetting`` on it:
the value instruction (the ``[neutral]`` tag) is given at turn 1 of a conversation whose earlier turns are
pronoun fillers, and the held-out query is asked at turn t = 1…num_turns; adherence is the neutral-language
rate of the greedy answers, with and without the instruction.
"""

from __future__ import annotations

from .driver import fmt, line_plot, series

CLAIM = ("In-context alignment controls behaviour through prompts without training, but models forget value "
         "instructions in longer conversations.")
SIZES = {"default": dict(prompts=100, turns=8), "quick": dict(prompts=8, turns=2)}


def run_seed(run) -> dict:
    size = SIZES["quick" if run.quick else "default"]
    _, sft_dir = run.pipeline_stage("sft")
    result, _ = run.flow("icl", "icl_forgetting", dict(mode="forgetting", init_from=sft_dir,
                                                       num_eval_examples=size["prompts"], num_turns=size["turns"]))
    by_turn = result["forgetting"]["adherence_by_turn"]
    out = {f"adherence_instructed/turn={t}": v for t, v in by_turn["instruction at turn 1"]}
    out.update({f"adherence_uninstructed/turn={t}": v for t, v in by_turn["no instruction"]})
    return out


def plot(results, root) -> list:
    panels = {"neutral-language rate by turn of the query": {"instruction at turn 1": "adherence_instructed",
                                                             "no instruction": "adherence_uninstructed"}}
    return [line_plot(root / "forgetting.png", panels, results, xlabel="turn of the query",
                      title="value instruction at turn 1 only (SFT model)")]


def findings(results) -> list:
    told, plain = series(results, "adherence_instructed"), series(results, "adherence_uninstructed")
    first, last = told[0], told[-1]
    return [f"adherence with the instruction at turn 1: turn 1 {fmt(first[1], first[2])}, turn {last[0]:g} "
            f"{fmt(last[1], last[2])} (change {last[1] - first[1]:+.3f}); without it: turn 1 "
            f"{fmt(plain[0][1], plain[0][2])}, turn {plain[-1][0]:g} {fmt(plain[-1][1], plain[-1][2])}",
            "the instruction is " + ("forgotten" if all(b < a for a, b in zip(first[3], last[3])) else
                                     "not forgotten on every seed") + f" by turn {last[0]:g}"]
