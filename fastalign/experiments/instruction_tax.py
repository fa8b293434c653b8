"""``instruction-tax``: the in-context flow's ``instruct`` measurement over seeds.

The pipeline's SFT model (:data:`fastalign.pipeline.DEFAULTS`), then ``fastalign icl --mode instruct`` on it:
greedy answers to held-out pronoun prompts with and without the value instruction (the ``[neutral]`` tag), and
to held-out arithmetic prompts under the same prefix — the alignment tax is the arithmetic accuracy lost.
"""

from __future__ import annotations

from .driver import bar_plot, fmt

CLAIM = ("A value instruction in the prompt reduces the unwanted behaviour with no training (about 30 % in the "
         "lecture's example), and aligning for values costs capability elsewhere (the alignment tax).")
SIZES = {"default": dict(prompts=200), "quick": dict(prompts=8)}


def run_seed(run) -> dict:
    size = SIZES["quick" if run.quick else "default"]
    _, sft_dir = run.pipeline_stage("sft")
    result, _ = run.flow("icl", "icl_instruct", dict(mode="instruct", init_from=sft_dir,
                                                     num_eval_examples=size["prompts"]))
    rows = result["instruct"]["rows"]
    out = {}
    for key, row in (("no_instruction", rows["no instruction"]), ("instruction", rows["value instruction"])):
        out[f"neutral_rate_{key}"] = row["pronoun/neutral_rate"]
        out[f"stereotype_rate_{key}"] = row["pronoun/stereotype_rate"]
        out[f"arith_exact_match_{key}"] = row["arith/exact_match"]
    out["alignment_tax"] = out["arith_exact_match_no_instruction"] - out["arith_exact_match_instruction"]
    return out


def plot(results, root) -> list:
    panels = {"neutral-language rate": {"no instruction": "neutral_rate_no_instruction",
                                        "value instruction": "neutral_rate_instruction"},
              "stereotype rate": {"no instruction": "stereotype_rate_no_instruction",
                                  "value instruction": "stereotype_rate_instruction"},
              "arith exact match (the tax)": {"no instruction": "arith_exact_match_no_instruction",
                                              "value instruction": "arith_exact_match_instruction"}}
    return [bar_plot(root / "instruction_tax.png", panels, results, title="value instruction vs none (SFT model)")]


def findings(results) -> list:
    m, s = results["mean"], results["sd"]
    return [f"neutral-language rate {fmt(m['neutral_rate_no_instruction'], s['neutral_rate_no_instruction'])} → "
            f"{fmt(m['neutral_rate_instruction'], s['neutral_rate_instruction'])} with the instruction; stereotype "
            f"rate {fmt(m['stereotype_rate_no_instruction'], s['stereotype_rate_no_instruction'])} → "
            f"{fmt(m['stereotype_rate_instruction'], s['stereotype_rate_instruction'])}",
            "alignment tax (arith exact match without − with the instruction): "
            f"{fmt(m['alignment_tax'], s['alignment_tax'])}"
            f" (from {fmt(m['arith_exact_match_no_instruction'], s['arith_exact_match_no_instruction'])})"]
