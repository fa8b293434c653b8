"""``fastalign pipeline --quick --seeds 2``: every stage runs for every seed, each seed's table has every row and
its report.md links the curves; the table over seeds is their mean ± sd."""

import json
import math
import statistics

import pytest
import torch

from fastalign import cli
from fastalign.data import tasks
from fastalign.models.loading import load_causal_lm
from fastalign.pipeline import COLUMNS, aggregate, format_seed_table, format_table, seeded_init


def test_quick_pipeline_over_two_seeds_writes_tables_and_reports(tmp_path, capsys):
    assert cli.main(["pipeline", "--quick", "--seeds", "2", "--output_dir", str(tmp_path), "--name", "p",
                     "--threads", "1"]) == 0
    out = capsys.readouterr().out
    top = json.loads((tmp_path / "p" / "results.json").read_text())
    assert set(top) == {"seeds", "mean", "sd"} and list(top["seeds"]) == ["seed0", "seed1"]
    assert top["mean"]["sft"]["arith/exact_match"] == statistics.fmean(
        top["seeds"][s]["sft"]["arith/exact_match"] for s in ("seed0", "seed1"))
    table = format_seed_table(top["seeds"], top["mean"], top["sd"])
    assert table in out and table in (tmp_path / "p" / "report.md").read_text()
    assert "(seed1/report.md)" in (tmp_path / "p" / "report.md").read_text()
    # Each seed trained from its own initialisation: the two SFT models differ.
    sft = [load_causal_lm(str(tmp_path / "p" / s / "sft" / "model")).state_dict() for s in ("seed0", "seed1")]
    assert not torch.equal(sft[0]["lm_head.weight"], sft[1]["lm_head.weight"])
    for seed in (0, 1):
        _check_one_seed(tmp_path / "p" / f"seed{seed}", seed, top["seeds"][f"seed{seed}"])
    # The two seeds ran at once (--threads 1: one process each); seed 1 alone in this process measures the same.
    assert cli.main(["pipeline", "--quick", "--seed", "1", "--output_dir", str(tmp_path), "--name", "alone",
                     "--threads", "1", "--jobs", "1"]) == 0
    alone = json.loads((tmp_path / "alone" / "results.json").read_text())
    assert alone["seeds"]["seed1"] == top["seeds"]["seed1"]


def _check_one_seed(root, seed, rows_in_top):
    results = json.loads((root / "results.json").read_text())
    assert results["rows"] == rows_in_top
    icl_rows = [f"icl: {m}" for m in ("base", "instruct", "steer", "picle", "reflect")]
    assert list(results["rows"]) == ["untrained", "sft", "reward model", "dpo", "simpo", "d2o", "d2o_ga", "kto", "orpo",
                                     "grpo", "ppo", *icl_rows]
    for stage in ("untrained", "sft", "dpo", "simpo", "grpo", "ppo"):
        row = results["rows"][stage]
        assert 0 <= row["arith/exact_match"] <= 1 and 0 <= row["pronoun/neutral_rate"] <= 1
        assert 0 <= row["verifier_reward"] <= 1 and math.isfinite(row["learned_reward"])
        assert math.isfinite(row["kl_to_sft"])
    assert abs(results["rows"]["sft"]["kl_to_sft"]) < 1e-6  # the SFT model against itself
    assert 0 <= results["rows"]["reward model"]["reward_accuracy"] <= 1
    for stage in icl_rows:
        assert 0 <= results["rows"][stage]["pronoun/neutral_rate"] <= 1
    report = (root / "report.md").read_text()
    assert format_table(results["rows"]) in report
    assert f"seed: {seed}" in (root / "grpo" / "config.yaml").read_text()
    for stage in ("sft", "reward", "dpo", "simpo", "grpo", "ppo"):
        assert f"({stage}/curves.png)" in report and (root / stage / "curves.png").exists()
        assert (root / stage / "eval.json").exists() and (root / stage / "config.yaml").exists()
    assert "(icl/" in report
    # What the pipeline sets on top of each flow's defaults is listed, the in-context rows' keys included.
    assert "`max_steps: 4`" in report.split("- `sft`:")[1].splitlines()[0]
    icl_line = report.split("- `icl`:")[1].splitlines()[0]
    assert "`picle_steps: 2`" in icl_line and "`timing_batch_sizes: []`" in icl_line
    assert "picle_steps: 2" in (root / "icl" / "config.yaml").read_text()


def test_the_aggregate_is_the_mean_and_sd_of_the_seeds():
    per_seed = {
        "seed0": {"sft": {"arith/exact_match": 0.1, "kl_to_sft": 0.0}, "reward model": {"reward_accuracy": 0.7}},
        "seed1": {"sft": {"arith/exact_match": 0.3, "kl_to_sft": 0.0}, "reward model": {"reward_accuracy": 0.9}},
        "seed2": {"sft": {"arith/exact_match": 0.2}, "reward model": {"reward_accuracy": None}}}
    mean, sd = aggregate(per_seed)
    assert mean["sft"] == {"arith/exact_match": pytest.approx(0.2)}
    assert sd["sft"]["arith/exact_match"] == pytest.approx(0.1)
    assert mean["reward model"] == {}  # a measurement a seed lacks is not averaged over the others
    table = format_seed_table(per_seed, mean, sd).splitlines()
    assert "| 0.200 ± 0.100 (0.100, 0.300, 0.200) |" in table[2] and table[2].count("—") == len(COLUMNS) - 1
    one_mean, one_sd = aggregate({"seed4": per_seed["seed0"]})
    assert one_mean["sft"] == per_seed["seed0"]["sft"] and one_sd["sft"]["arith/exact_match"] is None


def test_two_seeds_give_different_data_and_initialisations(tmp_path):
    for kind in ("sft", "preferences", "prompts"):
        assert tasks.task_rows("arith+pronoun", kind, 8, seed=0) != tasks.task_rows("arith+pronoun", kind, 8, seed=1)
    weights = [load_causal_lm(seeded_init(tmp_path / f"init{s}", s)).state_dict() for s in (0, 1)]
    assert not torch.equal(weights[0]["model.embed_tokens.weight"], weights[1]["model.embed_tokens.weight"])
    # Seed 0 is the cached tiny model's own initialisation, so a one-seed pipeline starts where the flows do.
    assert torch.equal(weights[0]["model.embed_tokens.weight"],
                       load_causal_lm("tiny").state_dict()["model.embed_tokens.weight"])


def test_seed_and_seeds_are_exclusive_and_seeds_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["pipeline", "--seed", "1", "--seeds", "2", "--output_dir", str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err
    assert cli.main(["pipeline", "--seeds", "0", "--output_dir", str(tmp_path)]) == 1
    assert "seeds must be a whole number >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["pipeline", "--seeds", "2", "--jobs", "-1", "--output_dir", str(tmp_path)]) == 1
    assert "jobs must be a whole number >= 0 (0 = fit the cores), got -1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any folder is made


def test_table_marks_missing_values():
    table = format_table({"a": {"arith/exact_match": 0.5}, "b": {}})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].count("—") == len(COLUMNS) - 1 and "0.500" in lines[2]


def test_pipeline_rejects_unknown_stage(tmp_path, capsys):
    bad = tmp_path / "p.yaml"
    bad.write_text("no_such_stage: {max_steps: 3}\n")
    assert cli.main(["pipeline", "--config", str(bad), "--output_dir", str(tmp_path)]) == 1
    assert "no_such_stage" in capsys.readouterr().err
