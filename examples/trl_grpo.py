"""TRL's GRPOTrainer with fastalign's kernels: one line (``fa_trl.patch()``) before building the trainer.

Runs on fastalign's embedded tiny model (a ~1 M-parameter Llama with a character tokenizer, built and
cached on first use) in about a minute on CPU:

    python examples/trl_grpo.py [--steps 20] [--unpatched]

The reward is dense (the share of digits in the completion), so every group has signal from a random
model. Everything after ``patch()`` is a plain TRL script.
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

import fastalign.integrations.trl as fa_trl
from fastalign.models.tiny import tiny_path


def digit_share(completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--unpatched", action="store_true", help="run TRL's own head, for comparison")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    if not args.unpatched:
        fa_trl.patch()  # the one line

    rng = random.Random(0)
    prompts = [f"{rng.randint(0, 99)}+{rng.randint(0, 99)}=" for _ in range(256)]
    config = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-grpo-"), max_steps=args.steps,
                        per_device_train_batch_size=16, num_generations=8, max_completion_length=8,
                        learning_rate=3e-3, beta=0.04, logging_steps=max(1, min(5, args.steps)),
                        report_to="none", save_strategy="no",
                        bf16=False, use_cpu=True, activation_checkpointing=False, seed=0)
    trainer = GRPOTrainer(model=str(tiny_path()), reward_funcs=digit_share, args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts}))
    trainer.train()
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    print(f"reward {rewards[0]:.3f} -> {rewards[-1]:.3f} ({'TRL head' if args.unpatched else 'fastalign head'})")


if __name__ == "__main__":
    main()
