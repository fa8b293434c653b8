"""``overoptimization``: best-of-n and PPO against the learned reward model, gold and proxy reward against KL.

The pipeline's stages with the pipeline's configs (:data:`fastalign.pipeline.DEFAULTS`): SFT on
``arith_slips*15+pronoun``, then from the SFT model a reward model on ``pronoun+arith`` preferences: the *proxy*. The
*gold* reward is the task verifier (:class:`fastalign.rewards.VerifierReward`: the neutral "their" for pronoun,
exact match for arith). Both are measured on the same held-out prompts (``prompts`` per task, eval split), on
completions sampled at temperature 1, and plotted against √KL to the SFT model, Gao et al.'s (2022) axis:

* best-of-n: the SFT model samples ``samples`` completions of each prompt once; for n = 1, 2, 4, … the expected
  proxy and gold reward of the completion the reward model ranks first among n of them, averaged over every
  n-subset of the samples (:func:`best_of_n`: unbiased for n fresh samples). Its KL is the analytic
  ``log n − (n − 1)/n`` (Stiennon et al., 2020, appendix), exact when no two samples coincide and an upper bound
  otherwise (Beirami et al., 2024); the tiny model's answers coincide often, so ``bon_kl_plugin`` also reports the
  exact best-of-n KL of the samples' empirical distribution (:func:`best_of_n_kl_plugin`).
* PPO: the pipeline's PPO config from the SFT model, with a fixed KL coefficient β (``kl_target=0``) for each β in
  ``betas``, from a penalty that holds the policy near the start to none. Each run's ``eval.json`` gives the proxy
  and gold rewards of sampled (``eval_sampled_*``: what PPO maximises) and greedy completions and the Monte-Carlo
  KL to the start (``kl_to_start``); its ``start/...`` values are the SFT model's, at KL 0. The KL differs per seed,
  so PPO metrics are indexed by β and the KL is a metric of its own.

Overoptimization shows as gold peaking and then falling while proxy keeps rising with KL.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter

import torch

from fastalign.data import loading, tasks
from fastalign.engine.generation import decode, sample
from fastalign.models.loading import load_causal_lm, load_tokenizer
from fastalign.rewards import ModelReward

from .driver import fmt, pyplot, save_figure, series

CLAIM = ("Optimizing a learned reward model too hard overoptimizes it: the proxy reward keeps rising with the KL "
         "from the start policy while the true (gold) reward peaks and then falls (Gao et al., 2022).")
TASKS = "pronoun+arith"  # the reward model's and PPO's tasks (pipeline.DEFAULTS["reward"] and ["ppo"])
TASK_NAMES = tasks.parse_task_spec(TASKS)
# β on the reward model's scale (its "their" and stereotype scores differ by ~10): in 12 rollouts (seed 0, held-out
# KL to the SFT model) β = 5 stays at 0.01 nats, β = 2 reaches 1.1, β = 1 1.8, β = 0.2 2.0, β = 0 2.9; 12 of the
# pipeline's 30 rollouts keep each PPO run near 50 s on 2 cores.
SIZES = {
    "default": dict(prompts=100, samples=64, betas=(2.0, 1.0, 0.0), ppo=dict(max_steps=12)),
    "quick": dict(prompts=4, samples=4, betas=(0.1, 0.0), ppo={}),
}
# eval.json keys of a PPO run (prefixed "start/" for the SFT model it started from) → this experiment's names.
PPO_KEYS = {"proxy": "eval_sampled_learned_reward", "gold": "eval_sampled_verifier_reward",
            "proxy_greedy": "eval_learned_reward", "gold_greedy": "eval_verifier_reward",
            **{f"gold_{t}": f"eval_sampled_verifier_reward/{t}" for t in TASK_NAMES}}


def run_seed(run) -> dict:
    from fastalign import pipeline

    size = SIZES["quick" if run.quick else "default"]
    _, sft_dir = run.pipeline_stage("sft")
    _, rm_dir = run.pipeline_stage("reward", init_from=sft_dir)  # as the pipeline: the RM starts from the SFT model
    out = best_of_n_metrics(sft_dir, rm_dir, n_prompts=size["prompts"], samples=size["samples"], seed=run.seed)
    for beta in size["betas"]:
        values = dict(pipeline.DEFAULTS["ppo"], **(pipeline.QUICK["ppo"] if run.quick else {}), **size["ppo"],
                      init_from=sft_dir, reward_model=rm_dir, kl_coef=beta, kl_target=0.0,
                      num_eval_examples=size["prompts"])  # the held-out prompts best-of-n is measured on
        report, _ = run.flow("ppo", f"ppo_beta{beta:g}", values)
        out.update({f"ppo_{m}/beta={beta:g}": report[k] for m, k in PPO_KEYS.items()})
        out[f"ppo_kl/beta={beta:g}"] = report["kl_to_start"]
    # Every run measures its start (the SFT model) on the same prompts and random stream: the last one's will do.
    out.update({f"ppo_start_{m}": report[f"start/{k}"] for m, k in PPO_KEYS.items()})
    return out


def best_of_n(proxy, gold, n) -> tuple[float, float]:
    """Expected ``(proxy, gold)`` of the proxy-best of ``n`` samples drawn without replacement from the ``N`` given:
    the sample of proxy rank i (0 = lowest) is the best of a random n-subset with probability C(i, n−1) / C(N, n)."""
    if not 1 <= n <= len(proxy):
        raise ValueError(f"n must be in 1..{len(proxy)} (the samples drawn), got {n}")
    order = sorted(range(len(proxy)), key=proxy.__getitem__)
    subsets = math.comb(len(proxy), n)
    weights = [math.comb(rank, n - 1) / subsets for rank in range(len(proxy))]
    return (sum(w * proxy[i] for w, i in zip(weights, order)), sum(w * gold[i] for w, i in zip(weights, order)))


def best_of_n_kl(n) -> float:
    """KL(best-of-n ‖ π) when no two samples coincide: ``log n − (n − 1)/n`` (Stiennon et al., 2020)."""
    return math.log(n) - (n - 1) / n


def best_of_n_kl_plugin(proxy, outcomes, n) -> float:
    """KL(best-of-n ‖ π) with π the empirical distribution of ``outcomes`` (identical samples pooled, ranked by
    proxy): best-of-n picks the outcome of proxy-CDF F with probability F^n − F_below^n."""
    counts, score = Counter(outcomes), dict(zip(outcomes, proxy))
    below, kl = 0.0, 0.0
    for outcome in sorted(counts, key=score.__getitem__):
        p = counts[outcome] / len(outcomes)
        picked = (below + p) ** n - below ** n
        kl += picked * math.log(picked / p) if picked > 0 else 0.0
        below += p
    return kl


def best_of_n_metrics(sft_dir, rm_dir, *, n_prompts, samples, seed) -> dict:
    """``bon_{proxy,gold,gold_<task>,kl_plugin}/n=<n>`` for n = 1, 2, 4, … ≤ ``samples``: means over the held-out
    prompts of :func:`best_of_n` of ``samples`` temperature-1 completions of each from the SFT model."""
    tokenizer = load_tokenizer(sft_dir)
    lm, judge = load_causal_lm(sft_dir), ModelReward(rm_dir, tokenizer, batch_size=256)
    rows = tasks.task_rows(TASKS, "prompts", n_prompts, seed=seed, split="eval")
    ns = [2 ** k for k in range(int(math.log2(samples)) + 1)]
    per_prompt = []  # (task, {n: (proxy, gold)}, {n: plug-in KL})
    for task_name in TASK_NAMES:  # each task its own completion length, as the PPO evaluation samples them
        task, group = tasks.get_task(task_name), [r for r in rows if r["task"] == task_name]
        ids = [loading.encode_prompt(tokenizer, r["prompt"]) for r in group]
        rollout = sample(lm, tokenizer, ids, max_new_tokens=task.max_new_tokens, temperature=1.0,
                         num_samples=samples, batch_size=512, generator=torch.Generator().manual_seed(seed))
        completions = rollout.completions()
        sampled_rows = [group[i] for i in rollout.prompt_index.tolist()]
        texts = decode(tokenizer, completions)
        proxy = judge(sampled_rows, texts, completion_ids=completions)  # the tokens as sampled, EOS kept
        gold = [task.reward(r, t) for r, t in zip(sampled_rows, texts)]
        for start in range(0, len(proxy), samples):  # a prompt's samples are contiguous
            part = slice(start, start + samples)
            outcomes = [tuple(c) for c in completions[part]]
            per_prompt.append((task_name, {n: best_of_n(proxy[part], gold[part], n) for n in ns},
                               {n: best_of_n_kl_plugin(proxy[part], outcomes, n) for n in ns}))
    out = {}
    for n in ns:
        out[f"bon_proxy/n={n}"] = statistics.fmean(p[1][n][0] for p in per_prompt)
        out[f"bon_gold/n={n}"] = statistics.fmean(p[1][n][1] for p in per_prompt)
        for task_name in TASK_NAMES:
            out[f"bon_gold_{task_name}/n={n}"] = statistics.fmean(p[1][n][1] for p in per_prompt if p[0] == task_name)
        out[f"bon_kl_plugin/n={n}"] = statistics.fmean(p[2][n] for p in per_prompt)
    return out


# ------------------------------------------------------------------------------------------- report
def bon_points(results, metric) -> list:
    """``[(√KL, mean, sd, [each seed's value]), ...]`` of a best-of-n metric, at the analytic KL of its n."""
    return [(math.sqrt(best_of_n_kl(n)), m, s, v) for n, m, s, v in series(results, f"bon_{metric}")]


def ppo_points(results, metric) -> list:
    """``[(label, [each seed's √KL], [each seed's value]), ...]``: the start (KL 0), then β from large to small."""
    seeds = list(results["seeds"].values())
    points = [("start", [0.0] * len(seeds), [s[f"ppo_start_{metric}"] for s in seeds])]
    for beta, *_, values in sorted(series(results, f"ppo_{metric}"), reverse=True):
        kls = [math.sqrt(max(s[f"ppo_kl/beta={beta:g}"], 0.0)) for s in seeds]  # an MC estimate can dip below 0
        points.append((f"β={beta:g}", kls, values))
    return points


def plot(results, root) -> list:
    plt = pyplot()
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    panels = {"gold: verifier reward (sampled)": ["gold"],
              "gold by task (sampled)": [f"gold_{t}" for t in TASK_NAMES],
              "proxy: reward-model score (sampled)": ["proxy"]}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8))
    for ax, (title, metrics) in zip(axes, panels.items()):
        for metric in metrics:
            name = metric.replace("gold_", "")
            pts = bon_points(results, metric)
            line = ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                               capsize=3, label=f"best-of-n ({name})" if len(metrics) > 1 else "best-of-n")
            for x, *_, values in pts:
                ax.scatter([x] * len(values), values, s=8, alpha=0.4, color=line[0].get_color())
            pts = ppo_points(results, metric)
            line = ax.errorbar([statistics.fmean(k) for _, k, _ in pts], [statistics.fmean(v) for *_, v in pts],
                               xerr=[sd(k) for _, k, _ in pts], yerr=[sd(v) for *_, v in pts], marker="s",
                               linestyle="--", capsize=3, label=f"PPO ({name})" if len(metrics) > 1 else "PPO")
            for label, kls, values in pts:
                ax.scatter(kls, values, s=8, alpha=0.4, color=line[0].get_color())
                ax.annotate(label, (statistics.fmean(kls), statistics.fmean(values)), fontsize=6,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("√KL to the SFT model (best-of-n: analytic; PPO: measured)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return [save_figure(fig, root / "overoptimization.png",
                        "best-of-n and PPO against the learned reward model: gold and proxy vs √KL")]


def gold_noise(results, gold) -> float:
    """Twice the binomial standard error of a difference of two mean gold rewards near ``gold``: each is a mean of
    0/1 verifier rewards over the held-out prompts of every seed (seed-to-seed spread aside)."""
    size = SIZES["quick" if results.get("quick") else "default"]
    m = size["prompts"] * len(TASK_NAMES) * len(results["seeds"])
    return 2 * math.sqrt(2 * max(gold * (1 - gold), 1 / m) / m)


def fall_after_peak(points) -> str:
    """``points``: ``[(label, gold, proxy), ...]`` in order of KL → ``(label of the gold peak, how far gold falls
    from it by the largest KL, how much proxy changes meanwhile)``."""
    peak = max(range(len(points)), key=lambda i: points[i][1])
    return points[peak][0], points[peak][1] - points[-1][1], points[-1][2] - points[peak][2]


def findings(results) -> list:
    mean, sd = results["mean"], results["sd"]
    gold, proxy = series(results, "bon_gold"), series(results, "bon_proxy")
    top = int(gold[-1][0])
    lines = [f"best-of-n, n = 1 → {top} (analytic KL 0 → {best_of_n_kl(top):.2f} nats; plug-in KL of the samples "
             f"{fmt(mean[f'bon_kl_plugin/n={top}'], sd[f'bon_kl_plugin/n={top}'])}): proxy "
             f"{fmt(proxy[0][1], proxy[0][2])} → {fmt(proxy[-1][1], proxy[-1][2])}, gold "
             f"{fmt(gold[0][1], gold[0][2])} → {fmt(gold[-1][1], gold[-1][2])}; gold by task "
             + ", ".join(f"{t} {mean[f'bon_gold_{t}/n=1']:.3f} → {mean[f'bon_gold_{t}/n={top}']:.3f}"
                         for t in TASK_NAMES)]
    ppo = [(label, statistics.fmean(k), statistics.fmean(v)) for label, k, v in ppo_points(results, "gold")]
    ppo_proxy = [statistics.fmean(v) for *_, v in ppo_points(results, "proxy")]
    lines.append("PPO (sampled completions; mean √KL, proxy, gold) — " + "; ".join(
        f"{label}: {x:.2f}, {p:.3f}, {g:.3f}" for (label, x, g), p in zip(ppo, ppo_proxy)))
    by_task = {t: [statistics.fmean(v) for *_, v in ppo_points(results, f"gold_{t}")] for t in TASK_NAMES}
    order = sorted(range(len(ppo)), key=lambda i: ppo[i][1])
    lines.append(f"PPO gold by task, start → largest KL ({ppo[order[-1]][0]}): " + ", ".join(
        f"{t} {g[0]:.3f} → {g[order[-1]]:.3f}" for t, g in by_task.items()))
    for name, points in (("best-of-n", [(f"n = {n:g}", g, p[1]) for (n, g, *_), p in zip(gold, proxy)]),
                         ("PPO", [(ppo[i][0], ppo[i][2], ppo_proxy[i]) for i in order])):
        peak, fall, proxy_gain = fall_after_peak(points)
        noise = gold_noise(results, max(g for _, g, _ in points))
        if fall > noise:
            lines.append(f"{name}: gold peaks at {peak} and falls {fall:.3f} (> 2 standard errors, {noise:.3f}) by "
                         f"the largest KL while proxy changes {proxy_gain:+.3f} meanwhile"
                         + (": overoptimization" if proxy_gain > 0 else ""))
        else:
            lines.append(f"{name}: gold does not fall beyond noise at larger KL (largest fall after its peak at "
                         f"{peak}: {max(fall, 0):.3f}, 2 standard errors {noise:.3f}): gold tracks proxy up to the "
                         "largest KL reached, no overoptimization at this scale")
    return lines
