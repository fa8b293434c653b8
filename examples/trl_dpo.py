"""TRL's DPOTrainer with fastalign's kernels: one line (``fa_trl.patch()``) before building the trainer.

Runs on fastalign's embedded tiny model (built and cached on first use) in about a minute on CPU:

    python examples/trl_dpo.py [--steps 40] [--unpatched]

The pairs prefer the right sum of two digits over a wrong one; the reward margin grows as DPO trains.
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

import fastalign.integrations.trl as fa_trl
from fastalign.models.tiny import tiny_path


def pairs(n, seed=0):
    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        wrong = (a + b + rng.randint(1, 9)) % 19
        rows["prompt"].append(f"{a}+{b}=")
        rows["chosen"].append(str(a + b))
        rows["rejected"].append(str(wrong))
    return Dataset.from_dict(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--unpatched", action="store_true", help="run TRL's own head, for comparison")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    if not args.unpatched:
        fa_trl.patch()  # the one line

    config = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-dpo-"), max_steps=args.steps,
                       per_device_train_batch_size=16, learning_rate=1e-3, beta=0.1,
                       logging_steps=max(1, min(10, args.steps)), report_to="none", save_strategy="no",
                       bf16=False, use_cpu=True,
                       activation_checkpointing=False, seed=0)
    trainer = DPOTrainer(model=str(tiny_path()), args=config, train_dataset=pairs(512))
    trainer.train()
    logs = [r for r in trainer.state.log_history if "rewards/margins" in r]
    print(f"loss {logs[0]['loss']:.4f} -> {logs[-1]['loss']:.4f}, reward margin {logs[-1]['rewards/margins']:.3f} "
          f"({'TRL head' if args.unpatched else 'fastalign head'})")


if __name__ == "__main__":
    main()
