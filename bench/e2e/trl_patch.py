"""TRL's own trainers, unpatched vs ``fastalign.integrations.trl.patch()`` vs fastalign's trainer subclasses.

Variants: ``trl`` (TRL as installed), ``patched`` (``patch()``, then TRL's trainer: the primitive swap) and
``subclass`` (``fastalign.integrations.trl.DPOTrainer`` / ``GRPOTrainer``: the whole loss from
``fastalign.losses``; GRPO and DPO only). For each trainer and shape, each variant runs in its own fresh
process with the same thread count, fp32 (``bf16=False``, activation checkpointing off), model, data, seed
and steps. Reported: wall time of ``trainer.train()``, peak RSS growth over the process's state after
imports and model loading (sampled every 2 ms), where the time went (``breakdown``: GRPO's generation,
the rest of its batch preparation -- reference and old log-probs, rewards --, the loss forward, the
backward, and the rest: optimizer, logging), and each variant's ratios to ``trl`` against the issue's targets.

Shapes: ``tiny`` (the built-in ~1 M-parameter model, a few tokens: framework overhead only, use it to
check the script) and ``head`` (vocab 32000, hidden 512, 4 layers: the LM head dominates).
On ``head``: GRPO 8 completions x 256 tokens (min_new_tokens forces the length), beta 0.04;
DPO 4 pairs, 32-token prompts, 512-token completions; SFT 8 rows of 32 + 512 tokens.
Targets (patched / unpatched): GRPO <= 0.7x wall and <= 0.55x peak growth; DPO <= 0.6x and <= 0.6x;
SFT <= 0.8x and <= 0.5x.

    python bench/e2e/trl_patch.py [--shapes tiny,head] [--trainers grpo,dpo,sft] [--steps N] [--threads 1]
                                  [--variants trl,patched,subclass] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_vs_trl import PeakRSS, model_path  # noqa: E402  (the same sampler and cached models)

# per shape and trainer: prompt tokens, completion tokens, rows per step (GRPO: completions per step = G)
SIZES = {
    "tiny": {"grpo": (8, 8, 8), "dpo": (8, 16, 4), "sft": (8, 16, 8)},
    "head": {"grpo": (32, 256, 8), "dpo": (32, 512, 4), "sft": (32, 512, 8)},
}
TARGETS = {"grpo": (0.7, 0.55), "dpo": (0.6, 0.6), "sft": (0.8, 0.5)}
LETTERS = "abcdefghijklmnopqrstuvwxyz     "
VARIANTS = ("trl", "patched", "subclass")
SUBCLASSED = ("grpo", "dpo")  # the trainers fastalign.integrations.trl subclasses


def text(rng, n):
    return "".join(rng.choice(LETTERS) for _ in range(n))


def write_data(trainer, shape, steps, path):
    import random

    rng = random.Random(0)
    prompt, completion, rows = SIZES[shape][trainer]
    n = rows * steps * 2
    with open(path, "w") as f:
        for _ in range(n):
            row = {"prompt": text(rng, prompt)}
            if trainer == "dpo":
                row.update(chosen=text(rng, completion), rejected=text(rng, completion))
            elif trainer == "sft":
                row.update(completion=text(rng, completion))
            f.write(json.dumps(row) + "\n")


def letter_reward(completions, **columns):
    return [c.count("a") / max(len(c), 1) for c in completions]


def time_calls(owner, name, breakdown, bucket):
    """Wrap ``owner.name`` (an instance attribute from then on) so its calls add their wall time to ``bucket``."""
    fn = getattr(owner, name)

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            breakdown[bucket] = breakdown.get(bucket, 0.0) + time.perf_counter() - t

    setattr(owner, name, timed)


def worker(args):
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl

    import fastalign.integrations.trl as fa_trl

    if args.side == "patched":
        fa_trl.patch()
    classes = fa_trl if args.side == "subclass" else trl
    prompt, completion, rows = SIZES[args.shape][args.trainer]
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = datasets.load_dataset("json", data_files=args.data, split="train")
    common = dict(output_dir=str(Path(args.tmp) / args.side), max_steps=args.steps, learning_rate=1e-5,
                  lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no", bf16=False,
                  use_cpu=True, activation_checkpointing=False, seed=0, dataloader_num_workers=0,
                  disable_tqdm=True, per_device_train_batch_size=rows)
    if args.trainer == "grpo":
        cfg = trl.GRPOConfig(**common, num_generations=rows, max_completion_length=completion, beta=0.04,
                             generation_kwargs={"min_new_tokens": completion})
        trainer = classes.GRPOTrainer(model=model, reward_funcs=letter_reward, args=cfg, train_dataset=data,
                                  processing_class=tok)
    elif args.trainer == "dpo":
        ref = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        cfg = trl.DPOConfig(**common, max_length=prompt + completion + 4)
        trainer = classes.DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=data, processing_class=tok)
    else:
        cfg = trl.SFTConfig(**common, max_length=prompt + completion + 4)
        trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
    breakdown = {}
    if args.trainer == "grpo":
        time_calls(trainer, "_generate", breakdown, "generation")
        time_calls(trainer, "_generate_and_score_completions", breakdown, "batch_preparation")
    time_calls(trainer, "compute_loss", breakdown, "loss_forward")
    time_calls(trainer.accelerator, "backward", breakdown, "backward")
    mem = PeakRSS()
    t = time.time()
    trainer.train()
    wall = time.time() - t
    growth = mem.stop()
    if "generation" in breakdown:  # batch_preparation includes the generation: keep the rest of it
        breakdown["batch_preparation"] -= breakdown["generation"]
    breakdown["rest"] = wall - sum(breakdown.values())
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    print(json.dumps({"wall_s": wall, "peak_growth_mb": growth / 2**20, "first_loss": losses[0],
                      "breakdown_s": breakdown}))


def run_side(side, trainer, shape, model, data, steps, threads, tmp):
    cmd = [sys.executable, __file__, "--side", side, "--trainer", trainer, "--shape", shape, "--model", model,
           "--data", data, "--steps", str(steps), "--threads", str(threads), "--tmp", tmp]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{trainer}/{shape}/{side} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="head")
    ap.add_argument("--trainers", default="grpo,dpo,sft")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (default: 5 tiny / 3 head)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="of: " + ", ".join(VARIANTS))
    ap.add_argument("--json", default="")
    ap.add_argument("--side", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--trainer", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return worker(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "trl" not in variants or any(v not in VARIANTS for v in variants):
        ap.error(f"--variants: a comma list of {list(VARIANTS)} including trl (the baseline), got {args.variants!r}")
    results = {}
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        if shape not in SIZES:
            ap.error(f"--shapes: unknown shape {shape!r}; known: {list(SIZES)}")
        for trainer in [t.strip() for t in args.trainers.split(",") if t.strip()]:
            if trainer not in TARGETS:
                ap.error(f"--trainers: unknown trainer {trainer!r}; known: {list(TARGETS)}")
            steps = args.steps or {"tiny": 5, "head": 3}[shape]
            with tempfile.TemporaryDirectory() as tmp:
                data = str(Path(tmp) / "data.jsonl")
                write_data(trainer, shape, steps, data)
                model = model_path(shape)
                sides = {side: run_side(side, trainer, shape, model, data, steps, args.threads, tmp)
                         for side in variants if side != "subclass" or trainer in SUBCLASSED}
            base = sides["trl"]
            ratios = {side: {"wall": r["wall_s"] / base["wall_s"],
                             "peak_growth": r["peak_growth_mb"] / max(base["peak_growth_mb"], 1e-9)}
                      for side, r in sides.items() if side != "trl"}
            wall_t, mem_t = TARGETS[trainer]
            results[f"{trainer}/{shape}"] = {"steps": steps, "threads": args.threads, **sides,
                                             **{f"{side}_over_trl": r for side, r in ratios.items()},
                                             "targets": {"wall": wall_t, "peak_growth": mem_t}}
            print(f"{trainer}/{shape}: steps {steps}, threads {args.threads}")
            for side, r in sides.items():
                spent = ", ".join(f"{k} {v:.1f}" for k, v in r["breakdown_s"].items())
                print(f"    {side:<8} step-1 loss {r['first_loss']:.6f}  wall {r['wall_s']:7.2f} s  "
                      f"peak growth {r['peak_growth_mb']:8.1f} MB  ({spent} s)")
            for side, ratio in ratios.items():
                print(f"    {side} / TRL: wall {ratio['wall']:.2f}x (target <= {wall_t}x), "
                      f"peak growth {ratio['peak_growth']:.2f}x (target <= {mem_t}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
