"""``fastalign pipeline``: every flow on the embedded default, then one results table and a report.

Stages, all on the tiny model and the built-in tasks: the untrained model (baseline) → SFT on
``arith+pronoun`` → a reward model from the SFT model → DPO and SimPO from the SFT model on the
``pronoun`` preference pairs (neutral "their" chosen over the stereotyped pronoun). Each stage's
model is then measured the same way on held-out data: ``arith`` exact match, ``pronoun``
neutral-language and stereotype rates, KL to the SFT model, and the reward model's pair accuracy.
Writes ``<output_dir>/<name>/results.json`` and ``report.md`` (table + training curves).

A YAML file (``--config``) may hold per-stage overrides: ``{sft: {max_steps: 300}, dpo: {beta: 0.2}}``.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from fastalign.data import tasks
from fastalign.engine import evaluation
from fastalign.engine.config import DPOConfig, RewardConfig, SFTConfig, SimPOConfig, load_config
from fastalign.engine.runs import write_json
from fastalign.models.loading import load_causal_lm, load_tokenizer

STAGES = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig, "simpo": SimPOConfig}
# Sized for ~2-3 minutes on two CPU cores; QUICK is a smoke test of the same path.
DEFAULTS = {
    # Measured on 2 cores: held-out 2-digit addition climbs slowly to ~10-15% exact match by step 400 in this
    # mix (pure arith once reached 73% at step 300); pronoun needs few rows (16 occupations): 1 row in 16.
    "sft": dict(dataset="arith*15+pronoun", num_examples=600, max_steps=400, batch_size=128, micro_batch_size=16,
                lr=3e-3, warmup_steps=20, min_lr_ratio=0.1),
    # Gentle preference stages: enough to move the pronoun behaviour, little drift elsewhere (KL column).
    "reward": dict(dataset="pronoun+arith", num_examples=1000, max_steps=30, batch_size=32, lr=1e-3, warmup_steps=5),
    "dpo": dict(dataset="pronoun", num_examples=1000, max_steps=30, batch_size=32, lr=1e-4, beta=0.1, warmup_steps=5),
    "simpo": dict(dataset="pronoun", num_examples=1000, max_steps=30, batch_size=32, lr=1e-4, beta=2.0, gamma=0.5,
                  warmup_steps=5),
}
QUICK = {
    "sft": dict(num_examples=30, max_steps=4, batch_size=16, micro_batch_size=8),
    "reward": dict(num_examples=64, max_steps=2, batch_size=8),
    "dpo": dict(num_examples=64, max_steps=2, batch_size=8),
    "simpo": dict(num_examples=64, max_steps=2, batch_size=8),
}
EVAL_TASKS = "arith+pronoun"
COLUMNS = [("arith/exact_match", "arith exact match"), ("pronoun/neutral_rate", "neutral-language rate"),
           ("pronoun/stereotype_rate", "stereotype rate"), ("reward_accuracy", "reward-model accuracy"),
           ("kl_to_sft", "KL to SFT (nats/completion)")]


def _stage_configs(name, output_dir, quick, seed, threads, overrides_file):
    file_overrides = {}
    if overrides_file:
        data = yaml.safe_load(Path(overrides_file).read_text()) or {}
        if not isinstance(data, dict) or any(k not in STAGES for k in data):
            bad = [k for k in data if k not in STAGES] if isinstance(data, dict) else [type(data).__name__]
            raise ValueError(f"pipeline config {overrides_file!r} must map stages {list(STAGES)} to overrides, "
                             f"got {bad}")
        file_overrides = data
    configs = {}
    for stage, cls in STAGES.items():
        values = dict(DEFAULTS[stage], **(QUICK[stage] if quick else {}), **(file_overrides.get(stage) or {}))
        values.update(name=f"{name}/{stage}", output_dir=output_dir, seed=seed, threads=threads,
                      num_eval_examples=20 if quick else 200, progress=not quick)
        configs[stage] = load_config(cls, overrides=values)
    return configs


def measure(lm, tokenizer, sft_lm, *, n, seed, batch_size=256) -> dict:
    """The table's columns for one model: task verifiers on held-out prompts and KL to the SFT model."""
    out = evaluation.task_metrics(lm, tokenizer, EVAL_TASKS, n=n, seed=seed, batch_size=batch_size)
    if sft_lm is not None:
        out["kl_to_sft"] = evaluation.kl_to_reference(lm, sft_lm, tokenizer, _eval_prompts(n, seed), seed=seed,
                                                      batch_size=batch_size)
    return out


def _eval_prompts(n, seed):
    return [r["prompt"] for r in tasks.task_rows(EVAL_TASKS, "prompts", n, seed=seed, split="eval")]


def format_table(rows: dict) -> str:
    """A Markdown table: one row per stage, one column per measurement ("—" where it does not apply)."""
    head = "| stage | " + " | ".join(title for _, title in COLUMNS) + " |"
    sep = "|---|" + "---|" * len(COLUMNS)
    lines = [head, sep]
    for stage, values in rows.items():
        cells = [f"{values[k]:.3f}" if isinstance(values.get(k), (int, float)) else "—" for k, _ in COLUMNS]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_pipeline(*, name="pipeline", output_dir="runs", quick=False, seed=0, threads=0, config=None) -> dict:
    """Run every stage and write the report; returns ``{"rows": {stage: metrics}, "report": path, ...}``."""
    import torch

    from fastalign.flows import dpo, reward, sft, simpo

    if threads:
        torch.set_num_threads(threads)
    configs = _stage_configs(name, output_dir, quick, seed, threads, config)
    root = Path(output_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    n_eval = configs["sft"].num_eval_examples
    timings, rows = {}, {}
    t_all = time.time()

    tokenizer = load_tokenizer("tiny")
    t = time.time()
    untrained_lm = load_causal_lm("tiny")
    rows["untrained"] = measure(untrained_lm, tokenizer, None, n=n_eval, seed=seed)
    timings["untrained"] = time.time() - t

    t = time.time()
    sft.run(configs["sft"])
    timings["sft"] = time.time() - t
    sft_dir = str(root / "sft" / "model")
    sft_lm = load_causal_lm(sft_dir)
    rows["untrained"]["kl_to_sft"] = evaluation.kl_to_reference(untrained_lm, sft_lm, tokenizer,
                                                                _eval_prompts(n_eval, seed), seed=seed)
    rows["sft"] = measure(sft_lm, tokenizer, sft_lm, n=n_eval, seed=seed)

    for stage, flow in (("reward", reward), ("dpo", dpo), ("simpo", simpo)):
        configs[stage].init_from = sft_dir
        t = time.time()
        result = flow.run(configs[stage])
        timings[stage] = time.time() - t
        if stage == "reward":
            rows["reward model"] = {"reward_accuracy": result.get("eval_accuracy")}
        else:
            rows[stage] = measure(load_causal_lm(str(root / stage / "model")), tokenizer, sft_lm, n=n_eval, seed=seed)
    timings["total"] = time.time() - t_all

    table = format_table(rows)
    report = write_report(root, table, rows, timings, configs)
    write_json(root / "results.json", {"rows": rows, "timings_s": timings})
    print("\n" + table + f"\n\nreport: {report}  (total {timings['total']:.0f} s)")
    return {"rows": rows, "timings_s": timings, "report": str(report), "table": table}


def write_report(root: Path, table: str, rows: dict, timings: dict, configs: dict) -> Path:
    lines = ["# fastalign pipeline report", "",
             f"Tiny Llama (character-level) trained from scratch on the built-in tasks: SFT on "
             f"`{configs['sft'].dataset}`, then a reward model (`{configs['reward'].dataset}`), DPO and SimPO "
             f"from the SFT model on `{configs['dpo'].dataset}` pairs (neutral \"their\" chosen "
             "over the stereotyped pronoun). All numbers on held-out prompts/pairs; greedy decoding for the "
             "task verifiers; KL is a Monte-Carlo estimate on completions sampled from each model.", "",
             table, "", "## Time per stage (s)", "",
             "| " + " | ".join(timings) + " |", "|" + "---|" * len(timings),
             "| " + " | ".join(f"{v:.1f}" for v in timings.values()) + " |", "", "## Training curves", ""]
    for stage in STAGES:
        png = root / stage / "curves.png"
        if png.exists():
            lines += [f"### {stage}", "", f"![{stage} curves]({stage}/curves.png)", ""]
    lines += ["## Stage configs", ""] + [f"- `{s}`: `{c.name}` → `{Path(c.output_dir) / c.name}/config.yaml`"
                                         for s, c in configs.items()]
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
