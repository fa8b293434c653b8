"""``fastalign plan``'s predicted peak memory against the measured peak of real CPU runs of each flow.

For each model (``tiny``: the built-in ~1 M-parameter model; ``head``: vocab 32000, hidden 512, 4 layers,
the head-heavy shape of bench/e2e/trl_patch.py) and flow (SFT, DPO, GRPO, PPO), one fresh process:
imports everything a run touches, warms up torch's CPU kernels, takes its resident memory as the
baseline (and resets the kernel's high-water mark), runs the flow itself (``flow.run(cfg)``, 2 steps, fp32,
one thread) and reports the high-water mark above the baseline (``VmHWM - baseline`` from /proc; glibc's
mmap threshold pinned, see ``PINNED_MALLOC``) when the training steps are done (the start of the final
checkpoint), and for the whole run with the checkpoint write (host memory on a GPU run). The
prediction is ``plan_memory`` of the same config object. Data rows are longer than ``max_length``, so every
sequence is cut to full length, as the plan assumes. Memory does not depend on machine load.

    python bench/e2e/plan_vs_measured.py [--models tiny,head] [--flows sft,dpo,grpo,ppo]
                                         [--json bench/results/cpu-plan.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from dpo_vs_trl import model_path  # noqa: E402  (the same cached tiny and head-heavy models)

TOLERANCE = 0.20
# per model and flow: config keys of the run (every run: 2 steps, fp32, one thread, a data file of long rows)
RUNS = {
    "tiny": {
        "sft": dict(batch_size=32, max_length=128),
        "dpo": dict(batch_size=16, max_length=128),
        "grpo": dict(batch_size=8, num_generations=8, max_length=96, max_new_tokens=48),
        "ppo": dict(batch_size=32, mini_batch_size=32, ppo_epochs=1, max_length=96, max_new_tokens=48),
    },
    "head": {
        "sft": dict(batch_size=8, max_length=256),
        "dpo": dict(batch_size=4, max_length=256),
        "grpo": dict(batch_size=2, num_generations=4, max_length=192, max_new_tokens=64),
        "ppo": dict(batch_size=8, mini_batch_size=8, ppo_epochs=1, max_length=192, max_new_tokens=64),
    },
}
LETTERS = "abcdefghijklmnopqrstuvwxyz     "
# glibc raises its mmap threshold as large blocks are freed, after which freed tensors stay resident in the heap
# (tiny SFT: 505 MiB of RSS for 247 MiB of live tensors). Pinned, every block >= 64 KiB is mmapped and returned
# when freed, so the resident high-water mark follows the live tensors, as a GPU allocator's peak does.
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def completion_length_reward(prompts, completions, **_):
    """A GRPO reward with some spread: the completion's length (its value does not change the memory)."""
    return [float(len(c)) for c in completions]


def write_data(flow: str, path: Path, rows: int = 64):
    import random

    rng = random.Random(0)
    text = lambda n: "".join(rng.choice(LETTERS) for _ in range(n))  # noqa: E731
    with open(path, "w") as f:
        for _ in range(rows):
            row = {"prompt": text(400)}  # longer than any max_length: rows are cut to full length
            if flow == "sft":
                row = {"prompt": text(8), "completion": text(400)}
            elif flow == "dpo":
                row = {"prompt": text(8), "chosen": text(400), "rejected": text(400)}
            f.write(json.dumps(row) + "\n")


def reward_model_folder(model: str, folder: Path) -> str:
    """A reward model folder (causal LM + scalar head) of the model's shape, for PPO's reward and value models."""
    import torch

    from fastalign.models.heads import ScalarHeadModel
    from fastalign.models.loading import load_causal_lm, load_tokenizer

    if not (folder / ScalarHeadModel.HEAD_FILE).exists():
        torch.manual_seed(0)
        ScalarHeadModel(load_causal_lm(model)).save(folder, load_tokenizer(model))
    return str(folder)


def config_for(model_name: str, flow: str, work: Path):
    from fastalign.engine import config as cfgmod
    from fastalign.flows import FLOWS

    data = work / f"{flow}.jsonl"
    write_data(flow, data)
    model = model_path(model_name)
    keys = dict(RUNS[model_name][flow], model=model, dataset=str(data), num_examples=0, max_steps=2, threads=1,
                dtype="float32", output_dir=str(work / "runs"), name=f"{model_name}-{flow}", progress=False,
                warmup_steps=0, seed=0)
    if flow == "grpo":
        keys["rewards"] = ["plan_vs_measured:completion_length_reward"]
    if flow == "ppo":
        keys["reward_model"] = reward_model_folder(model, work / f"reward-{model_name}")
    return cfgmod.load_config(FLOWS[flow].config_class(), **keys)


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(model_name: str, flow: str, work: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    # Everything a run imports comes before the baseline (datasets alone adds ~170 MB of resident memory).
    import datasets  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import tqdm  # noqa: F401
    import transformers  # noqa: F401

    from fastalign.engine.plan import plan_memory
    from fastalign.engine.trainer import Trainer
    from fastalign.flows import FLOWS

    cfg = config_for(model_name, flow, work)
    a = torch.randn(64, 64, requires_grad=True)
    (a @ a).sum().backward()  # torch's CPU kernels and autograd engine warmed up before the baseline

    # The high-water mark when the first checkpoint starts = the training peak (every optimizer step is done:
    # save_every is 0). Writing the checkpoint serializes weights and AdamW states in host memory, which on a GPU
    # run is host RAM, not GPU memory: it is reported apart.
    training_peak = {}
    save = Trainer.save

    def save_and_record(self):
        training_peak.setdefault("kib", rss_kib("VmHWM"))
        return save(self)

    Trainer.save = save_and_record
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    baseline = rss_kib("VmRSS")
    FLOWS[flow].run(cfg)
    whole_run = (rss_kib("VmHWM") - baseline) * 1024
    measured = (training_peak["kib"] - baseline) * 1024
    plan = plan_memory(flow, cfg, 1)
    return {"model": model_name, "flow": flow, "config": dict(RUNS[model_name][flow]),
            "predicted_bytes": plan.peak, "measured_bytes": measured, "ratio": plan.peak / measured,
            "whole_run_bytes": whole_run, "whole_run_ratio": plan.peak / whole_run, "plan": plan.to_dict()}


def replan(path: Path) -> int:
    """Recompute the predictions of a results file with the current planner; the measurements stay."""
    from fastalign.engine.plan import plan_memory

    out = json.loads(path.read_text())
    with tempfile.TemporaryDirectory(prefix="plan-vs-measured-") as tmp:
        for r in out["results"]:
            assert r["config"] == RUNS[r["model"]][r["flow"]], f"{r['model']}/{r['flow']}: the run's shape changed"
            plan = plan_memory(r["flow"], config_for(r["model"], r["flow"], Path(tmp)), 1)
            r.update(predicted_bytes=plan.peak, ratio=plan.peak / r["measured_bytes"],
                     whole_run_ratio=plan.peak / r["whole_run_bytes"], plan=plan.to_dict())
            report(r)
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {path}")
    return 0 if all(abs(r["ratio"] - 1) <= TOLERANCE for r in out["results"]) else 1


def report(r: dict):
    ok = abs(r["ratio"] - 1) <= TOLERANCE
    print(f"{r['model']:<5} {r['flow']:<5} predicted {r['predicted_bytes'] / 2**20:8.1f} MiB  measured "
          f"{r['measured_bytes'] / 2**20:8.1f} MiB  ratio {r['ratio']:.2f}  {'within' if ok else 'OUTSIDE'} "
          f"{TOLERANCE:.0%}  (whole run with the checkpoint write {r['whole_run_bytes'] / 2**20:.1f} MiB, "
          f"ratio {r['whole_run_ratio']:.2f})", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,head")
    parser.add_argument("--flows", default="sft,dpo,grpo,ppo")
    parser.add_argument("--json", default=str(HERE.parent / "results" / "cpu-plan.json"))
    parser.add_argument("--replan", action="store_true",
                        help="keep the measurements in --json and recompute only the predictions (after a planner "
                             "change; memory measurements do not change with it)")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "FLOW", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        model_name, flow, work = args.worker
        print("RESULT " + json.dumps(worker(model_name, flow, Path(work)), default=str))
        return 0
    if args.replan:
        return replan(Path(args.json))

    results = []
    with tempfile.TemporaryDirectory(prefix="plan-vs-measured-") as tmp:
        for model_name in args.models.split(","):
            for flow in args.flows.split(","):
                if model_name not in RUNS or flow not in RUNS[model_name]:
                    raise SystemExit(f"no run for model {model_name!r} and flow {flow!r}; known: "
                                     f"{ {m: list(f) for m, f in RUNS.items()} }")
                env = dict(os.environ, OMP_NUM_THREADS="1", **PINNED_MALLOC, PYTHONPATH=os.pathsep.join(
                    [str(HERE), os.environ.get("PYTHONPATH", "")]))
                proc = subprocess.run([sys.executable, __file__, "--worker", model_name, flow, tmp],
                                      capture_output=True, text=True, env=env)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{model_name}/{flow}: the worker failed (exit {proc.returncode})")
                r = json.loads(line[0][len("RESULT "):])
                results.append(r)
                report(r)
    out = {"machine": f"{os.cpu_count()}-core CPU, torch threads 1, fp32", "tolerance": TOLERANCE,
           "measure": "VmHWM - VmRSS after imports and warm-up (/proc/self/status) when the training steps are done "
                          "(whole_run_*: after the final checkpoint's write too), one process per run, glibc "
                          f"malloc pinned with {PINNED_MALLOC}",
           "command": "python bench/e2e/plan_vs_measured.py", "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.json}")
    return 0 if all(abs(r["ratio"] - 1) <= TOLERANCE for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
