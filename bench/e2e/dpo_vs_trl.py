"""End-to-end DPO on CPU: TRL's ``DPOTrainer`` vs ``fastalign dpo``, same model, data, batch, steps, threads.

Both run fp32 (TRL: ``bf16=False``, activation checkpointing off), beta 0.1, sigmoid loss, a frozen
reference copy, AdamW at the same lr, each in its own fresh process. Reported per shape, from one
script run: step-1 loss (ln 2 = 0.693147 when policy = reference), training wall time and peak RSS
growth over the process's state after imports (sampled every 2 ms), and the fastalign/TRL ratios.

Shapes: ``tiny`` (the built-in 1 M-parameter model, 49-token sequences) and ``head`` (vocab 32000,
hidden 512, 4 layers, T = 512: the LM head dominates). Targets: head — wall ≤ 0.7×, peak growth
≤ 0.5× TRL's; tiny — no slower than TRL.

    python bench/e2e/dpo_vs_trl.py [--quick] [--shapes tiny,head] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHAPES = {
    # name: (model builder kwargs or "tiny", prompt chars, completion chars, pairs per batch)
    "tiny": dict(model="tiny", prompt=24, completion=4, batch=8),
    "head": dict(model=dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024),
                 prompt=448, completion=62, batch=4),
}


class PeakRSS:
    """Peak resident memory above a baseline, sampled from /proc on a background thread."""

    def __init__(self):
        self.baseline = self._rss()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        return self.peak - self.baseline


def model_path(shape: str) -> str:
    from fastalign.models import tiny

    spec = SHAPES[shape]["model"]
    if spec == "tiny":
        return str(tiny.tiny_path())
    target = tiny.cache_dir() / f"bench-{shape}"
    if not (target / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = tiny.build_tokenizer()
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                             tie_word_embeddings=False, **spec))
        model.save_pretrained(target)
        tok.save_pretrained(target)
    return str(target)


def write_data(shape: str, n: int, path: Path):
    import random

    spec = SHAPES[shape]
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz     "
    text = lambda k: "".join(rng.choice(letters) for _ in range(k))
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text(spec["prompt"]), "chosen": text(spec["completion"]),
                                "rejected": text(spec["completion"])}) + "\n")


def worker(args):
    import torch

    torch.set_num_threads(args.threads)
    import datasets  # noqa: F401  (imports before the baseline: both sides pay the same import cost)
    import transformers  # noqa: F401

    if args.worker == "trl":
        import trl  # noqa: F401
    else:
        import fastalign.flows.dpo  # noqa: F401
    spec = SHAPES[args.shape]
    max_length = spec["prompt"] + spec["completion"] + 2
    mem = PeakRSS()
    out = Path(args.tmp) / args.worker
    if args.worker == "trl":
        from datasets import load_dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        data = load_dataset("json", data_files=args.data, split="train")
        cfg = DPOConfig(output_dir=str(out), per_device_train_batch_size=spec["batch"], max_steps=args.steps,
                        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, beta=0.1,
                        bf16=False, activation_checkpointing=False, gradient_checkpointing=False, use_cpu=True,
                        logging_steps=1, report_to="none", save_strategy="no", max_length=max_length,
                        dataloader_num_workers=0, seed=0, weight_decay=0.0, max_grad_norm=1.0)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
        t = time.time()
        trainer.train()
        wall = time.time() - t
        first_loss = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
    else:
        from fastalign.engine.config import DPOConfig, load_config
        from fastalign.engine.logging import read_metrics
        from fastalign.flows import dpo

        cfg = load_config(DPOConfig, overrides=dict(
            model=args.model, dataset=args.data, num_examples=0, max_length=max_length, batch_size=spec["batch"],
            max_steps=args.steps, lr=args.lr, warmup_steps=0, min_lr_ratio=1.0, beta=0.1, log_every=1,
            output_dir=str(Path(args.tmp)), name="fastalign", progress=False, threads=args.threads, seed=0,
            keep_checkpoints=1))
        t = time.time()
        dpo.run(cfg)
        rows = read_metrics(out / "metrics.jsonl")
        wall = rows[-1]["time"]  # the training loop itself (no model saving / evaluation)
        first_loss = rows[0]["loss"]
        del t
    growth = mem.stop()
    print(json.dumps({"wall_s": wall, "peak_growth_mb": growth / 2**20, "first_loss": first_loss}))


def run_side(side, shape, model, data, steps, threads, lr, tmp, script=__file__):
    """Run ``script --worker side`` in a fresh process (this folder importable) and return its JSON line."""
    cmd = [sys.executable, script, "--worker", side, "--shape", shape, "--model", model, "--data", data,
           "--steps", str(steps), "--threads", str(threads), "--lr", str(lr), "--tmp", tmp]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps (2 on the head-heavy shape, 10 on tiny)")
    ap.add_argument("--shapes", default="tiny,head")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (default: 30 tiny / 4 head; quick 10 / 2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-4)
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
        steps = args.steps or {"tiny": 10 if args.quick else 30, "head": 2 if args.quick else 4}[shape]
        with tempfile.TemporaryDirectory() as tmp:
            data = str(Path(tmp) / "pairs.jsonl")
            write_data(shape, SHAPES[shape]["batch"] * steps, Path(data))
            model = model_path(shape)
            sides = {side: run_side(side, shape, model, data, steps, args.threads, args.lr, tmp)
                     for side in ("trl", "fastalign")}
        ratio = {"wall": sides["fastalign"]["wall_s"] / sides["trl"]["wall_s"],
                 "peak_growth": sides["fastalign"]["peak_growth_mb"] / max(sides["trl"]["peak_growth_mb"], 1e-9)}
        results[shape] = {"steps": steps, "threads": args.threads, **sides, "fastalign_over_trl": ratio}
        print(f"{shape:>5}: steps {steps}, threads {args.threads}")
        for side in ("trl", "fastalign"):
            r = sides[side]
            print(f"       {side:<9} step-1 loss {r['first_loss']:.6f}  wall {r['wall_s']:7.2f} s  "
                  f"peak growth {r['peak_growth_mb']:8.1f} MB")
        print(f"       fastalign / TRL: wall {ratio['wall']:.2f}x, peak growth {ratio['peak_growth']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
