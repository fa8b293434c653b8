"""``fastalign experiment overoptimization``: end to end at ``--quick``; the best-of-n estimate and its KL."""

import itertools
import json
import math
import statistics

import pytest

from fastalign import cli
from fastalign.experiments.overoptimization import best_of_n, best_of_n_kl, best_of_n_kl_plugin


@pytest.mark.slow  # ~45 s: the quick SFT, reward model and two PPO runs
def test_quick_run_writes_finite_rewards_a_plot_and_findings(tmp_path):
    assert cli.main(["experiment", "overoptimization", "--quick", "--seeds", "1", "--threads", "1",
                     "--output_dir", str(tmp_path)]) == 0
    root = tmp_path / "overoptimization"
    results = json.loads((root / "results.json").read_text())
    seed = results["seeds"]["seed0"]
    assert all(math.isfinite(v) for v in seed.values())
    golds = [k for k in seed if "gold" in k]
    assert {"bon_gold/n=1", "bon_gold/n=4", "ppo_gold/beta=0.1", "ppo_gold/beta=0", "ppo_start_gold"} <= set(golds)
    assert all(0 <= seed[k] <= 1 for k in golds)  # the verifier gives 0 or 1
    # The proxy-best of all 4 samples scores at least their mean; its KL estimate is within the analytic bound.
    assert seed["bon_proxy/n=4"] >= seed["bon_proxy/n=1"] - 1e-6
    assert seed["bon_kl_plugin/n=1"] == pytest.approx(0.0, abs=1e-9)
    assert 0 <= seed["bon_kl_plugin/n=4"] <= best_of_n_kl(4) + 1e-9
    assert (root / "overoptimization.png").stat().st_size > 0 and (root / "seed0" / "ppo_beta0" / "eval.json").exists()
    report = (root / "report.md").read_text()
    assert "best-of-n, n = 1 → 4" in report and "PPO (sampled completions" in report
    assert "(overoptimization.png)" in report


def test_best_of_n_is_the_mean_over_every_n_subset_of_its_proxy_best_sample():
    proxy, gold = [3.0, 1.0, 2.0], [0.0, 1.0, 1.0]
    assert best_of_n(proxy, gold, 1) == pytest.approx((2.0, 2 / 3))
    assert best_of_n(proxy, gold, 2) == pytest.approx((8 / 3, 1 / 3))  # {3,1}→3, {3,2}→3, {1,2}→2 (gold 1)
    assert best_of_n(proxy, gold, 3) == pytest.approx((3.0, 0.0))
    proxy, gold = [0.3, -1.2, 2.5, 0.9, 0.1, 1.7], [1, 0, 0, 1, 1, 0]
    for n in range(1, 7):
        picks = [max(subset, key=lambda i: proxy[i]) for subset in itertools.combinations(range(6), n)]
        assert best_of_n(proxy, gold, n) == pytest.approx((statistics.fmean(proxy[i] for i in picks),
                                                          statistics.fmean(gold[i] for i in picks)))
    with pytest.raises(ValueError, match="n must be in 1..3"):
        best_of_n([1.0, 2.0, 3.0], [0, 0, 0], 4)


def test_best_of_n_kl_analytic_and_on_the_samples_own_distribution():
    assert best_of_n_kl(1) == 0.0 and best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(64) == pytest.approx(math.log(64) - 63 / 64)
    # Two outcomes, half each: best-of-2 picks the better one with probability 3/4.
    outcomes, proxy = ["his", "their", "their", "his"], [0.0, 1.0, 1.0, 0.0]
    assert best_of_n_kl_plugin(proxy, outcomes, 2) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert best_of_n_kl_plugin([0.5] * 5, ["her"] * 5, 8) == 0.0  # one answer: best-of-n changes nothing
    # Every sample distinct: the plug-in KL tends to the analytic one.
    many = list(range(20000))
    assert best_of_n_kl_plugin([float(i) for i in many], many, 4) == pytest.approx(best_of_n_kl(4), abs=1e-3)
