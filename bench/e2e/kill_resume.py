"""``kill -9`` at random points of SFT, DPO, GRPO and PPO runs; each is resumed and must end bit-identical.

For each flow: one uninterrupted run on the tiny model (``--threads 1``, a checkpoint every step), then
``--trials`` runs that are sent SIGKILL at a random moment (so some land mid-checkpoint-write), resumed
with ``--resume auto`` until they finish (killed again at random on the way, once), and compared with the
uninterrupted run's final weights (``model/model.safetensors``), tensor by tensor, exactly.

    python bench/e2e/kill_resume.py --trials 5 --json bench/results/cpu-kill-resume.json

Every run is a ``fastalign <flow>`` subprocess, as a user runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

COMMON = ["--model", "tiny", "--threads", "1", "--progress", "false", "--save_every", "1", "--keep_checkpoints", "2",
          "--num_eval_examples", "2"]
FLOWS = {
    "sft": ["--dataset", "arith", "--num_examples", "64", "--max_steps", "8", "--batch_size", "8"],
    "dpo": ["--dataset", "pronoun", "--num_examples", "64", "--max_steps", "8", "--batch_size", "8"],
    "grpo": ["--dataset", "arith", "--num_examples", "32", "--max_steps", "6", "--batch_size", "4",
             "--num_generations", "4", "--max_new_tokens", "6"],
    "ppo": ["--dataset", "pronoun", "--num_examples", "32", "--max_steps", "6", "--batch_size", "8",
            "--mini_batch_size", "4", "--ppo_epochs", "1", "--max_length", "48"],
}


def fastalign(flow: str, root: Path, name: str, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fastalign.cli", flow, "--output_dir", str(root), "--name", name, *COMMON,
           *FLOWS[flow], *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, what: str) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}: {err[-2000:]}")


def weights(run: Path) -> dict:
    return load_file(str(run / "model" / "model.safetensors"))


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="killed runs per flow")
    parser.add_argument("--flows", nargs="*", default=list(FLOWS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    results = []
    extra = {f: [] for f in FLOWS}
    if "ppo" in args.flows:  # PPO scores with a reward model: a brief one from the reward flow
        finish(fastalign_reward(root), "reward model")
        extra["ppo"] = ["--reward_model", str(root / "rm" / "model")]
    for flow in args.flows:
        t0 = time.time()
        finish(fastalign(flow, root, f"{flow}-straight", extra[flow]), f"{flow} uninterrupted")
        seconds = time.time() - t0
        want = weights(root / f"{flow}-straight")
        for trial in range(args.trials):
            name = f"{flow}-kill{trial}"
            kills = []
            for attempt in range(2):  # killed at random once or twice, then left to finish
                proc = fastalign(flow, root, name, extra[flow] + (["--resume", "auto"] if attempt else []))
                delay = rng.uniform(0.3, 0.9 * seconds)
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills.append(round(delay, 2))
                    continue
                if proc.returncode != 0:
                    raise RuntimeError(f"{name} exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
                break
            else:
                finish(fastalign(flow, root, name, extra[flow] + ["--resume", "auto"]), f"{name} resumed")
            same = identical(weights(root / name), want)
            results.append({"flow": flow, "trial": trial, "killed_after_s": kills, "bit_identical": same})
            print(f"{flow} trial {trial}: killed at {kills} s, bit-identical: {same}", flush=True)
    summary = {"trials": len(results), "bit_identical": sum(r["bit_identical"] for r in results),
               "machine": os.uname().machine, "cpu": _cpu(), "results": results}
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["bit_identical"] == summary["trials"] else 1


def fastalign_reward(root: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fastalign.cli", "reward", "--output_dir", str(root), "--name", "rm",
           "--model", "tiny", "--threads", "1", "--progress", "false", "--max_steps", "2", "--batch_size", "8",
           "--num_examples", "16", "--num_eval_examples", "2", "--max_length", "48"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
