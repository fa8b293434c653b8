"""Issue 13's target run: D²O on the pronoun negatives vs gradient ascent, from the pipeline's SFT model.

    python bench/e2e/d2o_target.py OUT sft                          # the pipeline's SFT stage, once
    python bench/e2e/d2o_target.py OUT d2o SEED [key=value ...]     # the pipeline's d2o stage (+ overrides;
                                                                    # init_from=DIR: another SFT model)
    python bench/e2e/d2o_target.py OUT d2o_ga SEED [key=value ...]  # its gradient-ascent baseline

Prints ``RESULT stage seed overrides neutral_rate stereotype_rate kl_to_start seconds`` (held-out,
200 pronoun prompts). The README's tables are seeds 0, 1, 2 of each, one process per run, --threads 1.
"""

import sys
import time
from pathlib import Path

from fastalign.engine.config import D2OConfig, SFTConfig, load_config
from fastalign.pipeline import DEFAULTS

FLOATS = ("lr", "beta", "alpha", "temperature")
STRINGS = ("init_from", "sample_prefix", "dataset")

out, stage = Path(sys.argv[1]), sys.argv[2]
if stage == "sft":
    from fastalign.flows import sft

    sft.run(load_config(SFTConfig, overrides=dict(DEFAULTS["sft"], name="sft", output_dir=str(out), threads=1,
                                                  progress=False)))
else:
    from fastalign.flows import d2o

    seed = int(sys.argv[3])
    extra = dict(a.split("=", 1) for a in sys.argv[4:])
    label = "".join(f"-{k}{v}" for k, v in extra.items() if k != "init_from")
    values = dict(DEFAULTS[stage], name=f"{stage}-s{seed}" + "".join(c if c.isalnum() or c in "-._" else "_"
                                                                      for c in label),
                  output_dir=str(out), threads=1, progress=False, seed=seed, init_from=str(out / "sft" / "model"),
                  num_eval_examples=200)
    values.update({k: v if k in STRINGS else float(v) if k in FLOATS else int(v) for k, v in extra.items()})
    t = time.time()
    report = d2o.run(load_config(D2OConfig, overrides=values))
    print("RESULT", stage, seed, extra, report.get("pronoun/neutral_rate"), report.get("pronoun/stereotype_rate"),
          report.get("kl_to_start"), round(time.time() - t), flush=True)
