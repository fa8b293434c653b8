"""End-to-end GRPO on CPU: TRL's ``GRPOTrainer`` vs ``fastalign grpo``, the same job on both sides.

Same model, prompts, group size G, completion length, steps, reward function, learning rate, thread count,
fp32 (TRL: ``bf16=False``, gradient checkpointing off), beta 0 (no reference on either side), loss type
dapo, temperature 1, one optimizer step per rollout; each side in its own fresh process. Reported per
shape, from one script run: training wall time (generation + scoring + optimizer steps) and peak RSS
growth over the process's state after imports (sampled every 2 ms), and the fastalign/TRL ratios.

Shapes: ``tiny`` (the built-in 1 M-parameter model, 8-token completions) and ``head`` (vocab 32000,
hidden 512, 4 layers, 256-token completions: the LM head dominates). Targets: head — wall ≤ 0.7×,
peak growth ≤ 0.5× TRL's; tiny — no slower than TRL.

    python bench/e2e/grpo_vs_trl.py [--quick] [--shapes tiny,head] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The same RSS sampler, models and subprocess runner as the DPO comparison.
from dpo_vs_trl import PeakRSS, model_path, run_side  # noqa: E402

SHAPES = {
    # name: model (builder kwargs or "tiny"), prompt chars, completion tokens, prompts per step, G
    "tiny": dict(model="tiny", prompt=16, completion=8, prompts=4, generations=8),
    "head": dict(model=dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024),
                 prompt=32, completion=256, prompts=2, generations=4),
}


def letter_reward(prompts, completions, **columns):
    """The shared reward: how often the completion uses the letter 'a' (dense, so every group has signal)."""
    return [float(c.count("a")) / max(len(c), 1) for c in completions]


def write_prompts(shape: str, n: int, path: Path):
    import random

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz     "
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": "".join(rng.choice(letters) for _ in range(SHAPES[shape]["prompt"]))}) + "\n")


def worker(args):
    import torch

    torch.set_num_threads(args.threads)
    import datasets  # noqa: F401  (imports before the baseline: both sides pay the same import cost)
    import transformers  # noqa: F401

    if args.worker == "trl":
        import trl  # noqa: F401
    else:
        import fastalign.flows.grpo  # noqa: F401
    spec = SHAPES[args.shape]
    mem = PeakRSS()
    out = Path(args.tmp) / args.worker
    if args.worker == "trl":
        from datasets import load_dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import GRPOConfig, GRPOTrainer

        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        data = load_dataset("json", data_files=args.data, split="train")
        cfg = GRPOConfig(output_dir=str(out), per_device_train_batch_size=spec["prompts"] * spec["generations"],
                         num_generations=spec["generations"], max_completion_length=spec["completion"],
                         max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
                         beta=0.0, loss_type="dapo", temperature=1.0, bf16=False, gradient_checkpointing=False,
                         activation_checkpointing=False, use_cpu=True, logging_steps=1, report_to="none",
                         save_strategy="no", dataloader_num_workers=0, seed=0, weight_decay=0.0, max_grad_norm=1.0)
        trainer = GRPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok,
                              reward_funcs=[letter_reward])
        t = time.time()
        trainer.train()
        wall = time.time() - t
        lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    else:
        from fastalign.engine.config import GRPOConfig, load_config
        from fastalign.engine.logging import read_metrics
        from fastalign.flows import grpo

        cfg = load_config(GRPOConfig, overrides=dict(
            model=args.model, dataset=args.data, num_examples=0, max_length=spec["prompt"] + spec["completion"] + 2,
            batch_size=spec["prompts"], num_generations=spec["generations"], max_new_tokens=spec["completion"],
            max_steps=args.steps, lr=args.lr, warmup_steps=0, min_lr_ratio=1.0, beta=0.0, loss_type="dapo",
            temperature=1.0, rewards="grpo_vs_trl:letter_reward", log_every=1, output_dir=str(Path(args.tmp)),
            name="fastalign", progress=False, threads=args.threads, seed=0, keep_checkpoints=1,
            num_eval_examples=1, generation_backend="hf"))
        t = time.time()
        # The training loop only: the run's own evaluation (greedy eval, KL) is not part of the TRL side.
        grpo.evaluation.policy_metrics = lambda *a, **k: {}
        grpo.evaluation.task_metrics = lambda *a, **k: {}
        grpo.run(cfg)
        rows = read_metrics(out / "metrics.jsonl")
        wall = rows[-1]["time"]
        lengths = [r["completion_length"] for r in rows]
        del t
    growth = mem.stop()
    print(json.dumps({"wall_s": wall, "peak_growth_mb": growth / 2**20,
                      "mean_completion_length": sum(lengths) / max(len(lengths), 1)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps (2 on the head-heavy shape, 5 on tiny)")
    ap.add_argument("--shapes", default="tiny,head")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (default: 20 tiny / 4 head; quick 5 / 2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--json", default="")
    ap.add_argument("--worker", choices=["trl", "fastalign"], help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    results = {}
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        if shape not in SHAPES:
            ap.error(f"--shapes: unknown shape {shape!r}; known: {list(SHAPES)}")
        steps = args.steps or {"tiny": 5 if args.quick else 20, "head": 2 if args.quick else 4}[shape]
        with tempfile.TemporaryDirectory() as tmp:
            data = str(Path(tmp) / "prompts.jsonl")
            write_prompts(shape, SHAPES[shape]["prompts"] * steps * 2, Path(data))
            model = model_path(shape)
            sides = {side: run_side(side, shape, model, data, steps, args.threads, args.lr, tmp, script=__file__)
                     for side in ("trl", "fastalign")}
        ratio = {"wall": sides["fastalign"]["wall_s"] / sides["trl"]["wall_s"],
                 "peak_growth": sides["fastalign"]["peak_growth_mb"] / max(sides["trl"]["peak_growth_mb"], 1e-9)}
        spec = SHAPES[shape]
        results[shape] = {"steps": steps, "threads": args.threads, "prompts_per_step": spec["prompts"],
                          "num_generations": spec["generations"], "max_completion_tokens": spec["completion"],
                          **sides, "fastalign_over_trl": ratio}
        print(f"{shape:>5}: steps {steps}, threads {args.threads}, {spec['prompts']} prompts x "
              f"G={spec['generations']}, <= {spec['completion']} completion tokens")
        for side in ("trl", "fastalign"):
            r = sides[side]
            print(f"       {side:<9} wall {r['wall_s']:7.2f} s  peak growth {r['peak_growth_mb']:8.1f} MB  "
                  f"mean completion {r['mean_completion_length']:.1f} tokens")
        print(f"       fastalign / TRL: wall {ratio['wall']:.2f}x, peak growth {ratio['peak_growth']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
