"""Padded vs packed training forward on CPU: the padding the packed forward removes and its speed-up.

One training forward + backward (``CausalLMLogprobs``: trunk, then the fused log-probs from hidden states and the
LM head, loss = -sum of the target log-probs) over the micro-batches the pipeline trains on:

- ``sft``: the pipeline's SFT data (``arith*15+pronoun``, max_length 128) in micro-batches of 16 rows;
- ``dpo``: the pipeline's DPO data (``pronoun`` preference pairs) in batches of 32 pairs (64 rows).

On CPU (sdpa) the packed forward packs rows into rows as long as the longest one (see fastalign/models/packed.py),
so it removes part of the padding; "padding" is the share a one-row varlen forward (flash_attention_2) removes.

Models: ``tiny`` (the built-in 1 M-parameter model) and ``head`` (vocab 32000, hidden 512, 4 layers: the
head-heavy shape of the TRL comparisons). Each (model, data, variant) runs in its own fresh process: one warm-up
iteration, then ``--iters`` (>= 3) timed ones over the same seeded micro-batches; reported per case: the padding
share of the padded batches (what ``packed`` removes), the median time per micro-batch of each variant and
packed / padded.

    python bench/e2e/packed_forward.py [--models tiny,head] [--data sft,dpo] [--iters 5] [--threads 1] [--json out]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The same models (and cached folders) as the TRL comparisons.
from dpo_vs_trl import SHAPES as MODELS  # noqa: E402
from dpo_vs_trl import model_path  # noqa: E402

# name: (pipeline dataset, row kind, rows or pairs per micro-batch)
DATA = {"sft": ("arith*15+pronoun", "sft", 16), "dpo": ("pronoun", "preferences", 32)}
MAX_LENGTH = 128  # the pipeline's (TrainConfig's default)
MICRO_BATCHES = 4  # distinct micro-batches each timed iteration runs


def micro_batches(tokenizer, data: str):
    """The seeded micro-batches of the pipeline's data, right-padded."""
    from fastalign.data import loading

    dataset, kind, size = DATA[data]
    rows = loading.load_rows(dataset, kind, n=1000, seed=0)[:size * MICRO_BATCHES]
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        if kind == "sft":
            out.append(loading.collate([loading.encode_sft(tokenizer, r, MAX_LENGTH) for r in chunk],
                                       tokenizer.pad_token_id))
        else:
            out.append(loading.collate_preferences([loading.encode_preference(tokenizer, r, MAX_LENGTH)
                                                    for r in chunk], tokenizer.pad_token_id))
    return out


def worker(args):
    import torch

    torch.set_num_threads(args.threads)
    from fastalign.models.heads import CausalLMLogprobs
    from fastalign.models.loading import load_causal_lm, load_tokenizer
    from fastalign.models.packed import forwarded_positions

    folder = model_path(args.model)
    tokenizer = load_tokenizer(folder)
    model = CausalLMLogprobs(load_causal_lm(folder), packed=args.variant == "packed")
    batches = micro_batches(tokenizer, args.data)

    def iteration():
        for b in batches:
            (-model(b.input_ids, b.attention_mask, b.labels).sum()).backward()
        model.zero_grad(set_to_none=True)

    iteration()  # warm-up
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        iteration()
        times.append((time.perf_counter() - t0) / len(batches))
    attention = model.lm.config._attn_implementation
    real = sum(int(b.attention_mask.sum()) for b in batches)
    slots = sum(b.attention_mask.numel() for b in batches)
    forwarded = slots if not model.packed else sum(forwarded_positions(b.attention_mask, attention) for b in batches)
    print(json.dumps({"seconds_per_microbatch": statistics.median(times), "times": times, "attention": attention,
                      "real_tokens": real, "padded_positions": slots, "forwarded_positions": forwarded,
                      "padding_share": 1 - real / slots}))


def run_case(model, data, variant, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--data", data, "--variant", variant,
           "--iters", str(args.iters), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{model}/{data}/{variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,head")
    ap.add_argument("--data", default="sft,dpo")
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per variant (>= 3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=["padded", "packed"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.iters < 3:
        ap.error(f"--iters must be >= 3, got {args.iters}")
    if args.worker:
        return worker(args)
    results = {}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        if model not in MODELS:
            ap.error(f"--models: unknown model {model!r}; known: {list(MODELS)}")
        for data in [d.strip() for d in args.data.split(",") if d.strip()]:
            if data not in DATA:
                ap.error(f"--data: unknown data {data!r}; known: {list(DATA)}")
            sides = {v: run_case(model, data, v, args) for v in ("padded", "packed")}
            speedup = sides["padded"]["seconds_per_microbatch"] / sides["packed"]["seconds_per_microbatch"]
            removed = 1 - sides["packed"]["forwarded_positions"] / sides["padded"]["padded_positions"]
            results[f"{model}/{data}"] = {**sides, "padding_removed": removed, "packed_speedup": speedup,
                                          "threads": args.threads, "iters": args.iters}
            print(f"{model:>4}/{data:<3}: padding {sides['padded']['padding_share']:.1%} of "
                  f"{sides['padded']['padded_positions']} positions, packed ({sides['packed']['attention']}) runs "
                  f"{sides['packed']['forwarded_positions']}: {removed:.1%} removed; "
                  f"padded {sides['padded']['seconds_per_microbatch'] * 1e3:.1f} ms, "
                  f"packed {sides['packed']['seconds_per_microbatch'] * 1e3:.1f} ms per micro-batch: "
                  f"{speedup:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
