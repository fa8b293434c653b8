"""``paradigms``: SFT-only, DPO, RLHF (reward model + PPO), GRPO and in-context alignment on one task, one verifier
and one training budget counted in token-passes.

The task is the pronoun one: from the pipeline's SFT model (stereotyped his/her), make the model say the neutral
"their". The verifier (:meth:`fastalign.data.tasks.PronounTask.reward`) is GRPO's reward and everyone's score:
the neutral-language rate of greedy answers to ``prompts`` held-out prompts, with the KL to the SFT model on them
and the arithmetic exact match (what the alignment costs elsewhere). DPO learns from preference pairs built by
the same rule, RLHF from a reward model trained on them, in-context alignment is the value instruction (the
``[neutral]`` tag) in front of the prompt, with no training.

Compute is counted, not estimated: :func:`count_token_passes` counts the tokens every transformer trunk (policy,
reference, reward and value models alike) processes inside the trainers' loops — forward token-passes, and the
backward ones (tokens of forwards run with gradients, each backward ≈ 2 forwards) — so sampling, reference and
reward-model forwards count, and the final evaluations do not. Each trained method gets the same budget: a
2-step calibration run measures its cost per step, and it then trains ``budget / cost`` steps (RLHF's reward
model is trained first and its cost comes out of RLHF's budget). The budget is the compute the pipeline's DPO
stage (30 steps) takes, so DPO runs its pipeline config; the others run what that buys them.
"""

from __future__ import annotations

import contextlib
import math

import torch

from fastalign.data import loading, tasks
from fastalign.engine import evaluation
from fastalign.engine.generation import decode, generate
from fastalign.models.loading import load_causal_lm, load_tokenizer
from fastalign.pipeline import stage_values

from .driver import bar_plot, fmt

CLAIM = ("The three paradigms trade quality, cost and stability: GRPO (a verifiable reward) > RLHF (a learned "
         "reward model + PPO) > DPO (offline preferences), while in-context alignment needs no training at all.")
METHODS = ("sft", "dpo", "rlhf", "grpo", "icl")
SIZES = {
    "default": dict(prompts=200, calibration_steps=2, budget_steps_of_dpo=30),
    "quick": dict(prompts=8, calibration_steps=1, budget_steps_of_dpo=2),
}
# GRPO on the pronoun task: the verifier's reward, 16 prompts x 8 samples a step at temperature 1.5 (at 1 the SFT
# model says "their" in ~2 % of samples, as D2O's stage found), lr 5e-4 without warmup.
GRPO = dict(dataset="pronoun", num_examples=1000, batch_size=16, num_generations=8, temperature=1.5, lr=5e-4,
            warmup_steps=0, epsilon_high=0.28)
GRPO_QUICK = dict(num_examples=16, batch_size=4, num_generations=4)


class TokenPasses:
    """Tokens processed by transformer trunks inside :meth:`Trainer.fit`: ``forward`` (every forward, sampling's
    one-token decode steps included) and ``backward`` (those run with gradients)."""

    def __init__(self):
        self.forward = self.backward = 0
        self.in_training = False

    @property
    def compute(self) -> float:
        """Forward-equivalent token-passes: a backward costs about two forwards."""
        return self.forward + 2 * self.backward


@contextlib.contextmanager
def count_token_passes():
    """Count the tokens of every ``LlamaModel`` forward run inside ``Trainer.fit``: the trunk class is patched for
    the duration (the tiny model and every head model built on it are Llama trunks)."""
    from transformers.models.llama.modeling_llama import LlamaModel

    from fastalign.engine.trainer import Trainer

    counter = TokenPasses()
    trunk_forward, fit = LlamaModel.forward, Trainer.fit

    def counted_forward(self, input_ids=None, *args, **kwargs):
        if counter.in_training:
            embeds = kwargs.get("inputs_embeds")
            tokens = input_ids.numel() if input_ids is not None else embeds.shape[:-1].numel()
            counter.forward += tokens
            counter.backward += tokens if torch.is_grad_enabled() else 0
        return trunk_forward(self, input_ids, *args, **kwargs)

    def counted_fit(self, *args, **kwargs):
        counter.in_training = True
        try:
            return fit(self, *args, **kwargs)
        finally:
            counter.in_training = False

    LlamaModel.forward, Trainer.fit = counted_forward, counted_fit
    try:
        yield counter
    finally:
        LlamaModel.forward, Trainer.fit = trunk_forward, fit


def budget_steps(budget: float, cost_per_step: float) -> int:
    """The whole steps a budget buys at a cost per step (at least one, so every method is measured)."""
    if cost_per_step <= 0:
        raise ValueError(f"cost_per_step must be > 0, got {cost_per_step}")
    return max(1, math.floor(budget / cost_per_step + 0.5))


def run_seed(run) -> dict:
    size = SIZES["quick" if run.quick else "default"]
    calib, dpo_steps = size["calibration_steps"], size["budget_steps_of_dpo"]
    _, sft_dir = run.pipeline_stage("sft")
    # The flows' own final evaluations are not counted; a small one keeps their time down (ours follows).
    common = dict(init_from=sft_dir, num_eval_examples=4 if run.quick else 20)
    with count_token_passes() as reward_model_cost:  # trained here, not reused: its compute is RLHF's
        _, rm_dir = run.flow("reward", "reward", stage_values("reward", run.quick, common))
    train = {
        "dpo": lambda steps, stage: run.flow("dpo", stage, stage_values("dpo", run.quick,
                                                                         dict(common, max_steps=steps)))[1],
        "rlhf": lambda steps, stage: run.flow("ppo", stage, stage_values("ppo", run.quick, dict(
            common, reward_model=rm_dir, max_steps=steps)))[1],
        "grpo": lambda steps, stage: run.flow("grpo", stage, {
            **stage_values("grpo", run.quick, common), **GRPO, **(GRPO_QUICK if run.quick else {}),
            "max_steps": steps})[1],
    }

    def cost_per_step(method) -> float:
        with count_token_passes() as probe:
            train[method](calib, f"{method}_calibration")
        return probe.compute / calib

    budget = cost_per_step("dpo") * dpo_steps
    out, folders = {"budget": budget, "compute_reward_model": reward_model_cost.compute}, {"sft": sft_dir}
    for method in ("dpo", "rlhf", "grpo"):
        before = reward_model_cost.compute if method == "rlhf" else 0.0
        steps = dpo_steps if method == "dpo" else budget_steps(max(budget - before, 0.0), cost_per_step(method))
        with count_token_passes() as used:
            folders[method] = train[method](steps, method)
        out[f"steps_{method}"], out[f"compute_{method}"] = steps, used.compute + before
    return dict(measure_methods(folders, n=size["prompts"], seed=run.seed), **out)


def measure_methods(folders: dict, *, n: int, seed: int) -> dict:
    """Per method: the neutral-language and stereotype rates of greedy answers to ``n`` held-out pronoun prompts,
    the arithmetic exact match on ``n`` held-out sums and the KL to the SFT model; ``icl`` is the SFT model with
    the value instruction in front of every prompt."""
    tokenizer = load_tokenizer("tiny")
    pronoun, arith = tasks.get_task("pronoun"), tasks.get_task("arith")
    pronoun_rows, arith_rows = pronoun.prompts(n, seed=seed, split="eval"), arith.prompts(n, seed=seed, split="eval")
    sft = load_causal_lm(folders["sft"])
    out = {}
    for method in METHODS:
        lm = sft if method in ("sft", "icl") else load_causal_lm(folders[method])
        prefix = tasks.NEUTRAL_TAG if method == "icl" else ""
        for task, rows in ((pronoun, pronoun_rows), (arith, arith_rows)):
            ids = [loading.encode_prompt(tokenizer, prefix + r["prompt"]) for r in rows]
            answers = decode(tokenizer, generate(lm, tokenizer, ids, max_new_tokens=task.max_new_tokens))
            out.update({f"{task.name}_{k}_{method}": v for k, v in task.score(rows, answers).items()})
        if method != "icl":  # the same model: its change is the prompt's, which this KL does not see
            out[f"kl_to_sft_{method}"] = 0.0 if method == "sft" else evaluation.kl_to_reference(
                lm, sft, tokenizer, [r["prompt"] for r in pronoun_rows], seed=seed)
    out["compute_sft"] = out["compute_icl"] = 0.0
    return out


def plot(results, root) -> list:
    names = {"sft": "SFT only", "dpo": "DPO", "rlhf": "RM + PPO", "grpo": "GRPO", "icl": "in-context"}
    panels = {"neutral-language rate (verifier)": {names[m]: f"pronoun_neutral_rate_{m}" for m in METHODS},
              "KL to SFT (nats/completion)": {names[m]: f"kl_to_sft_{m}" for m in METHODS if m != "icl"},
              "arith exact match": {names[m]: f"arith_exact_match_{m}" for m in METHODS},
              "training compute (token-passes)": {names[m]: f"compute_{m}" for m in METHODS if m != "sft"}}
    return [bar_plot(root / "paradigms.png", panels, results, title="alignment paradigms at one training budget")]


def findings(results) -> list:
    m, s = results["mean"], results["sd"]
    rate = lambda x: f"pronoun_neutral_rate_{x}"
    lines = [f"training budget {m['budget']:.3g} token-passes (the pipeline's DPO stage); steps bought: "
             + ", ".join(f"{x} {m[f'steps_{x}']:.0f}" for x in ("dpo", "rlhf", "grpo"))
             + f"; RLHF's reward model took {m['compute_reward_model'] / m['budget']:.0%} of its budget"]
    kl = lambda x: f"KL {m[f'kl_to_sft_{x}']:.2f}, " if f"kl_to_sft_{x}" in m else ""
    lines.append("neutral-language rate (mean ± sd over seeds): " + ", ".join(
        f"{x} {fmt(m[rate(x)], s[rate(x)])} ({kl(x)}arith {m[f'arith_exact_match_{x}']:.3f})" for x in METHODS))
    trained = sorted(("dpo", "rlhf", "grpo"), key=lambda x: -m[rate(x)])
    order = trained[0] + "".join((" = " if m[rate(a)] == m[rate(b)] else " > ") + b
                                 for a, b in zip(trained, trained[1:]))
    lines.append(f"order at this budget: {order} (the lecture's: grpo > rlhf > dpo); the steadiest "
                 f"over seeds: {min(trained, key=lambda x: s[rate(x)])}, the least steady: "
                 f"{max(trained, key=lambda x: s[rate(x)])}")
    return lines
