"""``fastalign pipeline --quick``: every stage runs, the table has every row, report.md links the curves."""

import json
import math

from fastalign import cli
from fastalign.pipeline import COLUMNS, format_table


def test_quick_pipeline_writes_table_and_report(tmp_path, capsys):
    assert cli.main(["pipeline", "--quick", "--output_dir", str(tmp_path), "--name", "p", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    root = tmp_path / "p"
    results = json.loads((root / "results.json").read_text())
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
    assert format_table(results["rows"]) in report and format_table(results["rows"]) in out
    for stage in ("sft", "reward", "dpo", "simpo", "grpo", "ppo"):
        assert f"({stage}/curves.png)" in report and (root / stage / "curves.png").exists()
        assert (root / stage / "eval.json").exists() and (root / stage / "config.yaml").exists()
    assert "(icl/" in report
    # What the pipeline sets on top of each flow's defaults is listed, the in-context rows' keys included.
    assert "`max_steps: 4`" in report.split("- `sft`:")[1].splitlines()[0]
    icl_line = report.split("- `icl`:")[1].splitlines()[0]
    assert "`picle_steps: 2`" in icl_line and "`timing_batch_sizes: []`" in icl_line
    assert "picle_steps: 2" in (root / "icl" / "config.yaml").read_text()


def test_table_marks_missing_values():
    table = format_table({"a": {"arith/exact_match": 0.5}, "b": {}})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].count("—") == len(COLUMNS) - 1 and "0.500" in lines[2]


def test_pipeline_rejects_unknown_stage(tmp_path, capsys):
    bad = tmp_path / "p.yaml"
    bad.write_text("no_such_stage: {max_steps: 3}\n")
    assert cli.main(["pipeline", "--config", str(bad), "--output_dir", str(tmp_path)]) == 1
    assert "no_such_stage" in capsys.readouterr().err
