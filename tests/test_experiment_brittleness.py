"""``fastalign experiment brittleness``: end to end at ``--quick``; the recovery arithmetic; the attacked prompts
keep the query last, the few-shot is stereotyped training data, the noise is drawn from the seed."""

import json
import math

import pytest

from fastalign import cli
from fastalign.data import tasks
from fastalign.experiments import brittleness


def test_quick_run_writes_finite_rates_a_plot_and_findings(tmp_path):
    assert cli.main(["experiment", "brittleness", "--quick", "--seeds", "1", "--threads", "1",
                     "--output_dir", str(tmp_path)]) == 0
    root = tmp_path / "brittleness"
    results = json.loads((root / "results.json").read_text())
    metrics = results["seeds"]["seed0"]
    for model in brittleness.MODELS:
        for prefix in brittleness.PREFIXES:
            rates = [metrics[f"{rate}_{model}/prefix={prefix}"] for rate in brittleness.RATES]
            assert all(0 <= r <= 1 for r in rates) and sum(rates) <= 1 + 1e-9
    assert all(math.isfinite(v) for v in metrics.values())
    assert all(k.startswith(("neutral_rate_", "stereotype_rate_", "other_rate_", "recovery_")) for k in metrics)
    assert (root / "brittleness.png").stat().st_size > 0
    report = (root / "report.md").read_text()
    assert "(brittleness.png)" in report
    for line in brittleness.findings(results):
        assert f"- {line}" in report
    assert any("PPO: the strongest attack" in line for line in brittleness.findings(results))


def test_recovery_is_the_share_of_the_removed_stereotype_rate_that_comes_back():
    assert brittleness.recovery(0.9, 0.3, 0.6) == pytest.approx(0.5)
    assert brittleness.recovery(0.9, 0.3, 0.9) == pytest.approx(1.0)
    assert brittleness.recovery(0.9, 0.3, 0.3) == 0.0
    assert brittleness.recovery(0.9, 0.3, 0.15) == pytest.approx(-0.25)  # the prefix helped alignment
    assert brittleness.recovery(0.5, 0.5, 0.8) is None  # nothing removed: no ratio
    assert brittleness.recovery(0.5, 0.6, 0.8) is None  # alignment made it worse
    assert brittleness.recovery(0.5, 0.49, 0.8) is None  # a removal of about a prompt is noise


def test_attacked_prompts_end_with_the_query_and_draw_their_prefixes_from_the_seed():
    task = tasks.get_task("pronoun")
    rows = task.prompts(10, seed=3, split="eval")
    prompts = brittleness.attacked_prompts(rows, seed=3)
    assert list(prompts) == list(brittleness.PREFIXES)
    for name, texts in prompts.items():
        assert len(texts) == len(rows)
        assert all(t.endswith(r["prompt"]) for t, r in zip(texts, rows))
        assert all((t == r["prompt"]) == (name == "none") for t, r in zip(texts, rows))
    # The few-shot lines are answered, stereotyped training sentences: never a held-out one, never "their".
    held_out = {r["prompt"] for r in task.prompts(1000, seed=0, split="eval")}
    for text in prompts["few_shot"]:
        *shots, _ = text.split("\n")
        assert len(shots) == brittleness.SHOTS
        for shot in shots:
            prompt, answer = shot.rsplit("=", 1)
            occupation = prompt.split()[1]
            assert prompt + "=" not in held_out and answer == task.stereotype(occupation)
    # Controls are as long as the attacks they stand for.
    for few, noise in zip(prompts["few_shot"], prompts["noise_long"]):
        assert len(noise) == len(few)
    assert {len(t) - len(r["prompt"]) for t, r in zip(prompts["noise_short"], rows)} == {len(brittleness.ROLE_PLAY)}
    # The same seed draws the same noise and demonstrations; another seed draws others.
    assert brittleness.attacked_prompts(rows, seed=3) == prompts
    other = brittleness.attacked_prompts(rows, seed=4)
    for name in ("noise_short", "noise_long", "few_shot"):
        assert other[name] != prompts[name]
    assert other["role_play"] == prompts["role_play"]
