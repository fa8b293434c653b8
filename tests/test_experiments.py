"""``fastalign experiment <name>``: each experiment end to end at ``--quick``; seeds give different data; the
aggregate is the seeds' mean; the pass@k estimate; bad arguments and an existing folder are refused."""

import json
import math
import os
import statistics

import pytest

from fastalign import cli
from fastalign.data import families
from fastalign.experiments import EXPERIMENTS
from fastalign.experiments.driver import aggregate, pass_at_k, series


def _run(tmp_path, name, seeds=1):
    assert cli.main(["experiment", name, "--quick", "--seeds", str(seeds), "--threads", "1",
                     "--output_dir", str(tmp_path)]) == 0
    root = tmp_path / name
    results = json.loads((root / "results.json").read_text())
    report = (root / "report.md").read_text()
    assert list(results["seeds"]) == [f"seed{s}" for s in range(seeds)]
    assert results["mean"] and set(results["mean"]) == set(results["sd"])
    for key, mean in results["mean"].items():
        values = [results["seeds"][s][key] for s in results["seeds"]]
        assert mean == pytest.approx(statistics.fmean(values)) and math.isfinite(mean)
        assert f"| {key} |" in report
    pngs = sorted(root.glob("*.png"))
    assert pngs and all(f"({p.name})" in report for p in pngs)
    assert "**Claim** (lecture)" in report and "## Findings" in report
    return root, results


def test_task_diversity_quick_two_seeds_train_on_different_data(tmp_path):
    root, results = _run(tmp_path, "task-diversity", seeds=2)
    assert [x for x, *_ in series(results, "heldout_exact_match")] == [2, 8]
    for s in ("seed0", "seed1"):
        assert 0 <= results["seeds"][s]["heldout_exact_match/N=8"] <= 1
        assert (root / s / "sft_N8" / "config.yaml").exists() and (root / s / "sft_N8" / "model").is_dir()
    # Each seed draws its own families and inputs, and never trains on a held-out family.
    data = {s: [json.loads(line) for line in (root / s / "data" / "N8.jsonl").read_text().splitlines()]
            for s in ("seed0", "seed1")}
    assert data["seed0"] != data["seed1"]
    held = set(families.heldout_family_names())
    assert all(r["family"] not in held for rows in data.values() for r in rows)
    assert len({r["family"] for r in data["seed0"]}) == 8
    assert "Machine: " in (root / "report.md").read_text()

    # A stopped run's results.json (seed0 only, no aggregate yet): --report_only renders what it measured.
    saved = {k: v for k, v in results.items() if k not in ("mean", "sd")}
    saved["seeds"], saved["timings_s"] = {"seed0": results["seeds"]["seed0"]}, {"seed0": 1.0}
    (root / "results.json").write_text(json.dumps(saved))
    assert cli.main(["experiment", "task-diversity", "--report_only", "--output_dir", str(tmp_path)]) == 0
    again = json.loads((root / "results.json").read_text())
    assert again["mean"] == results["seeds"]["seed0"] and "| seed0 |" in (root / "report.md").read_text()
    assert "seed1" not in (root / "report.md").read_text()


@pytest.mark.slow
def test_the_other_experiments_run_end_to_end_at_quick_size_and_share_the_sft_model(tmp_path, capsys):
    others = [n for n in EXPERIMENTS if n != "task-diversity"]
    assert others[0] == "selection"
    for name in others:
        root, results = _run(tmp_path, name)
        rates = {k: v for k, v in results["mean"].items() if "rate" in k or "exact_match" in k or "pass_" in k}
        assert all(0 <= v <= 1 for v in rates.values()), rates
        out = capsys.readouterr().out
        if name == "selection":
            assert (root / "seed0" / "sft" / "eval.json").exists() and "reusing" not in out
        else:  # the pipeline's SFT stage, same config and seed: trained once, by the first experiment
            assert f"sft: reusing the finished run {tmp_path / 'selection' / 'seed0' / 'sft'}" in out
            assert not (root / "seed0" / "sft").exists()


def test_aggregate_is_the_mean_and_sample_sd_of_the_seeds():
    per_seed = {"seed0": {"a/k=1": 0.2, "b": 1.0}, "seed1": {"a/k=1": 0.4, "b": 3.0}, "seed2": {"a/k=1": 0.9, "b": 2.0}}
    mean, sd = aggregate(per_seed)
    assert mean == pytest.approx({"a/k=1": 0.5, "b": 2.0})
    assert sd["b"] == pytest.approx(1.0) and sd["a/k=1"] == pytest.approx(statistics.stdev([0.2, 0.4, 0.9]))
    assert aggregate({"seed0": {"b": 3.0}}) == ({"b": 3.0}, {"b": 0.0})


def test_pass_at_k_matches_the_combinatorial_formula():
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0 and pass_at_k(10, 6, 5) == 1.0
    assert pass_at_k(64, 3, 1) == pytest.approx(3 / 64)
    assert pass_at_k(64, 3, 8) == pytest.approx(1 - math.comb(61, 8) / math.comb(64, 8))
    with pytest.raises(ValueError, match="k must be <= n"):
        pass_at_k(4, 1, 8)


def test_bad_arguments_and_an_existing_folder_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["experiment", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert cli.main(["experiment", "selection", "--seeds", "0", "--output_dir", str(tmp_path)]) == 1
    assert "--seeds must be >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["experiment", "selection", "--jobs", "-1", "--output_dir", str(tmp_path)]) == 1
    assert "--jobs must be >= 0" in capsys.readouterr().err
    (tmp_path / "selection").mkdir()
    (tmp_path / "selection" / "results.json").write_text("{}")
    assert cli.main(["experiment", "selection", "--quick", "--output_dir", str(tmp_path)]) == 1
    assert "already holds a run; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["experiment", "forgetting", "--report_only", "--output_dir", str(tmp_path)]) == 1
    assert "forgetting/results.json does not exist" in capsys.readouterr().err
    assert (tmp_path / "selection" / "results.json").read_text() == "{}"


def test_paradigms_counts_the_training_token_passes_of_every_trunk_and_nothing_outside_training(tmp_path):
    import torch
    from transformers.models.llama.modeling_llama import LlamaModel

    from fastalign.engine.config import SFTConfig, load_config
    from fastalign.experiments.paradigms import budget_steps, count_token_passes
    from fastalign.flows import FLOWS
    from fastalign.models.loading import load_causal_lm

    original = LlamaModel.forward
    cfg = load_config(SFTConfig, overrides=dict(dataset="arith", num_examples=16, max_steps=2, batch_size=4,
                                                  micro_batch_size=2, output_dir=str(tmp_path), name="sft",
                                                  num_eval_examples=3, threads=1, progress=False))
    with count_token_passes() as sft:
        FLOWS["sft"].run(cfg)
        # A forward outside a trainer's loop (here, after it) is not training compute.
        load_causal_lm(str(tmp_path / "sft" / "model"))(torch.ones(2, 5, dtype=torch.long))
    assert LlamaModel.forward is original  # the patch is undone
    # SFT trains every forward: 2 steps x 4 rows of <= 8 tokens (a 2-digit sum and its answer), no extra forwards.
    assert sft.backward == sft.forward and 2 * 4 * 5 <= sft.forward <= 2 * 4 * 12
    assert sft.compute == 3 * sft.forward
    assert budget_steps(1000, 100) == 10 and budget_steps(1000, 300) == 3 and budget_steps(10, 300) == 1
    with pytest.raises(ValueError, match="cost_per_step must be > 0"):
        budget_steps(10, 0)


def test_seeds_run_in_parallel_processes_measure_what_one_process_measures(tmp_path):
    from fastalign.experiments.driver import parallel_jobs

    assert parallel_jobs(0, 3) == 1 and parallel_jobs(10**6, 3) == 1 and parallel_jobs(1, 1) == 1
    assert parallel_jobs(1, 10**6) == 2 * (os.cpu_count() or 1)  # time-shared, capped for memory
    runs = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        assert cli.main(["experiment", "instruction-tax", "--quick", "--seeds", "2", "--threads", "1", "--jobs",
                         str(jobs), "--output_dir", str(out)]) == 0
        runs[jobs] = json.loads((out / "instruction-tax" / "results.json").read_text())
    assert runs[2]["jobs"] == 2 and runs[1]["jobs"] == 1
    assert list(runs[2]["seeds"]) == ["seed0", "seed1"] and runs[2]["seeds"] == runs[1]["seeds"]
    assert runs[2]["mean"] == runs[1]["mean"]
