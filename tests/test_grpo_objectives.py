"""The grpo flow's options for this year's objectives (issue 12): the example recipes run on the embedded
default, DAPO's dynamic sampling and overlong punishment, REINFORCE++ and the off-policy corrections in a
rollout, bad options name the option."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from fastalign.data import loading
from fastalign.engine.config import GRPOConfig, load_config
from fastalign.engine.distributed import DistState
from fastalign.engine.generation import HFSampler
from fastalign.engine.logging import read_metrics
from fastalign.flows import grpo
from fastalign.models.heads import PolicyValueModel
from fastalign.models.loading import load_causal_lm, load_tokenizer
from fastalign.rewards import build_rewards

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SMALL = dict(max_steps=2, batch_size=2, num_generations=4, num_examples=16, num_eval_examples=4, progress=False,
             threads=1, max_length=48)


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def seven_is_flat_reward(prompts, completions, **columns):
    """Zero variance for every prompt holding a 7, the completion length elsewhere."""
    return [0.0 if "7" in p else float(len(c)) for p, c in zip(prompts, completions)]


def constant_reward(prompts, completions, **columns):
    return [1.0] * len(prompts)


@pytest.mark.parametrize("recipe", ["grpo_gspo.yaml", "grpo_dapo.yaml", "grpo_cispo.yaml"])
def test_example_recipes_run_on_the_embedded_default(recipe, tmp_path):
    cfg = load_config(GRPOConfig, CONFIGS / recipe, overrides=dict(
        SMALL, output_dir=str(tmp_path), name=recipe, rewards=["test_grpo_objectives:length_reward"]))
    report = grpo.run(cfg)
    assert report["steps"] == 2
    assert (tmp_path / recipe / "model").is_dir()


def _rollout(cfg_over, reward, rows_seed=0, n_rows=3):
    torch.set_num_threads(1)
    tok, lm = load_tokenizer("tiny"), load_causal_lm("tiny")
    cfg = load_config(GRPOConfig, overrides=dict(num_generations=4, batch_size=n_rows, max_new_tokens=5,
                                                 dataset="arith", **cfg_over))
    make = grpo.make_rollout(PolicyValueModel(lm), HFSampler(lm, tok), build_rewards([reward]), None, tok, cfg,
                             DistState())
    pool = loading.load_rows("arith", "prompts", n=64, seed=rows_seed)
    state = {"i": n_rows}

    def more_rows():
        state["i"] += n_rows
        return pool[state["i"] - n_rows:state["i"]]

    return make, pool[:n_rows], more_rows, cfg


def test_dynamic_sampling_never_trains_on_a_zero_variance_group():
    make, rows, more_rows, cfg = _rollout(dict(dynamic_sampling=True, max_sampling_rounds=6),
                                          "test_grpo_objectives:seven_is_flat_reward")
    rows[0]["prompt"] = rows[0]["prompt"] + " 7"  # at least one flat group in the first round
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch, metrics = make(rows, torch.Generator().manual_seed(0), more_rows=more_rows)
    groups = batch.advantages.view(-1, cfg.num_generations)
    assert (groups.abs().sum(1) > 0).all()  # every kept group has an advantage somewhere
    assert metrics["sampling_rounds"] >= 2 and batch.input_ids.shape[0] <= 3 * cfg.num_generations


def test_dynamic_sampling_stops_after_max_rounds_with_a_warning():
    make, rows, more_rows, cfg = _rollout(dict(dynamic_sampling=True, max_sampling_rounds=2),
                                          "test_grpo_objectives:constant_reward")
    with pytest.warns(UserWarning, match="max_sampling_rounds=2"):
        batch, metrics = make(rows, torch.Generator().manual_seed(0), more_rows=more_rows)
    assert metrics["sampling_rounds"] == 2
    assert (batch.labels == -100).all()  # nothing informative: no token is trained


def test_overlong_punishment_formula():
    lengths = torch.tensor([1.0, 3.0, 4.0, 5.0, 6.0])
    got = grpo.overlong_penalty(lengths, max_tokens=5, buffer=2, penalty=1.0)
    assert got.tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_reinforce_pp_and_corrections_in_a_rollout():
    make, rows, _, cfg = _rollout(dict(advantage="reinforce_pp_baseline", rollout_is_correction="token_mask",
                                       rollout_is_low=0.5, off_policy_mask_threshold=0.0),
                                  "test_grpo_objectives:length_reward")
    batch, _ = make(rows, torch.Generator().manual_seed(1))
    mask = batch.labels[:, 1:] != -100
    assert batch.advantages.shape == mask.shape and (batch.advantages[~mask] == 0).all()
    assert batch.token_weights is not None and batch.token_weights.shape == mask.shape
    # HF sampling is the policy itself: the sampler's and the policy's log-probs agree, weights ~1 where kept.
    kept = batch.token_weights[mask]
    assert ((kept - 1).abs() < 1e-3).logical_or(kept == 0).all()
    loss_fn, weight_fn = grpo.grpo_loss_fn(grpo.FusedLinearGRPOLoss(loss_type="dapo", max_completion_length=5), cfg)
    loss, metrics = loss_fn(PolicyValueModel(load_causal_lm("tiny")), batch)
    assert math.isfinite(float(loss))


@pytest.mark.parametrize("over, name", [
    (dict(delta=1.1, epsilon_high=0.28), "delta"),
    (dict(ratio_clip_c=0.5), "ratio_clip_c"),
    (dict(loss_type="cispo"), "epsilon_high"),
    (dict(top_entropy_quantile=0.0), "top_entropy_quantile"),
    (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
    (dict(rollout_is_correction="token"), "rollout_is_correction"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level"),
    (dict(rollout_is_correction="token_mask", rollout_is_low=4.0), "rollout_is_low"),
])
def test_bad_options_name_the_option(over, name):
    with pytest.raises(ValueError, match=name):
        load_config(GRPOConfig, overrides=over)


# ------------------------------------------------- the entropy mask from the rollout-time policy forward
class _PrepassCounter:
    def __init__(self, monkeypatch):
        from fastalign.losses import grpo as grpo_loss

        self.calls = 0
        real = grpo_loss.chunked.linear_logprobs_no_grad

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(grpo_loss.chunked, "linear_logprobs_no_grad", counted)


@pytest.mark.parametrize("share_prompts", [True, False], ids=["shared_prompt_forward", "full_rows"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rollout_entropies_give_the_loss_its_mask_without_a_prepass(share_prompts, level, monkeypatch):
    """Rollout correction + top_entropy_quantile < 1 + one iteration: the rollout's policy forward stores the
    entropies (0 off the labels; micro-batches, concat and to() carry them), the loss takes the mask from them
    without its pre-pass, and its loss and gradients equal the pre-pass's."""
    make, rows, _, cfg = _rollout(dict(rollout_is_correction="token_truncate", top_entropy_quantile=0.4,
                                       entropy_coef=0.01, num_iterations=1, loss_type="dapo",
                                       importance_sampling_level=level, share_prompt_forward=share_prompts),
                                  "test_grpo_objectives:length_reward")
    batch, _ = make(rows, torch.Generator().manual_seed(2))
    mask = batch.labels[:, 1:] != -100
    assert batch.entropies is not None and batch.entropies.shape == mask.shape
    assert (batch.entropies[~mask] == 0).all() and (batch.entropies[mask] > 0).all()
    # The entropies are the policy's own at the sampling temperature (the rollout forward ran in eval mode).
    lm = load_causal_lm("tiny")
    policy = PolicyValueModel(lm)
    with torch.no_grad():
        hidden = policy(batch.input_ids, batch.attention_mask)[0][:, :-1]
        _, want = grpo.ops.token_logprobs(hidden, lm.get_output_embeddings().weight, batch.labels[:, 1:],
                                          temperature=cfg.temperature, return_entropy=True)
    assert (batch.entropies[mask] - want[mask]).abs().max() < 1e-5
    # The new field travels with the batch.
    n = batch.input_ids.shape[0]
    part = batch.rows(torch.arange(0, 5))
    assert part.entropies.shape == (5, part.input_ids.shape[1] - 1)
    both = grpo.concat_batches([batch.rows(torch.arange(0, 5)), batch.rows(torch.arange(5, n))], pad_id=0)
    assert torch.equal(both.entropies[:, :batch.entropies.shape[1]][mask], batch.entropies[mask])
    assert batch.to("cpu").entropies is not None

    loss_module = grpo.FusedLinearGRPOLoss(loss_type="dapo", top_entropy_quantile=0.4, entropy_coef=0.01,
                                           importance_sampling_level=level, temperature=cfg.temperature,
                                           max_completion_length=5)
    loss_fn, _ = grpo.grpo_loss_fn(loss_module, cfg)
    counter = _PrepassCounter(monkeypatch)

    def step(b):
        policy.zero_grad()
        loss, metrics = loss_fn(policy, b)
        loss.backward()
        return loss.detach(), metrics, [p.grad.clone() for p in policy.parameters() if p.grad is not None]

    got = step(batch)
    assert counter.calls == 0, "the loss ran its pre-pass although the rollout gave entropies"
    batch.entropies = None
    want = step(batch)
    assert counter.calls == 1
    assert abs(float(got[0]) - float(want[0])) <= 1e-5 * abs(float(want[0])) + 1e-7
    for k in want[1]:
        assert abs(float(got[1][k]) - float(want[1][k])) <= 1e-5 * abs(float(want[1][k])) + 1e-7, k
    for a, b in zip(got[2], want[2]):
        assert float((a - b).norm()) <= 1e-5 * float(b.norm()) + 1e-10


@pytest.mark.parametrize("over", [
    dict(rollout_is_correction="token_truncate", top_entropy_quantile=0.4, num_iterations=2),  # a changed policy
    dict(rollout_is_correction="token_truncate", top_entropy_quantile=1.0),                    # no mask
    dict(top_entropy_quantile=0.4),                                                            # no policy forward
])
def test_rollout_stores_no_entropies_otherwise(over):
    make, rows, _, _ = _rollout(over, "test_grpo_objectives:length_reward")
    batch, _ = make(rows, torch.Generator().manual_seed(3))
    assert batch.entropies is None


def test_grpo_run_with_rollout_entropies_equals_the_prepass_run(tmp_path, monkeypatch):
    """Two 2-step runs (rollout correction, entropy mask, one iteration): the loss gets the rollout's entropies,
    and a run whose loss ignores them (the pre-pass masks) logs the same losses and trains the same weights."""
    seen = []

    class Recording(grpo.FusedLinearGRPOLoss):
        drop = False

        def forward(self, *args, entropies=None, **kwargs):
            seen.append(entropies is not None)
            return super().forward(*args, entropies=None if self.drop else entropies, **kwargs)

    monkeypatch.setattr(grpo, "FusedLinearGRPOLoss", Recording)
    over = dict(SMALL, rewards=["test_grpo_objectives:length_reward"], rollout_is_correction="sequence_mask",
                top_entropy_quantile=0.3, entropy_coef=0.01, num_iterations=1, importance_sampling_level="sequence",
                output_dir=str(tmp_path))
    runs = {}
    for name, drop in (("given", False), ("prepass", True)):
        Recording.drop = drop
        seen.clear()
        grpo.run(load_config(GRPOConfig, overrides=dict(over, name=name)))
        assert seen and all(seen)  # the rollout gave the loss entropies at every step
        runs[name] = read_metrics(tmp_path / name / "metrics.jsonl")
    for a, b in zip(runs["given"], runs["prepass"]):
        for k in ("loss", "entropy", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-5 * abs(b[k]) + 1e-7, (k, a[k], b[k])
    given, prepass = (load_causal_lm(str(tmp_path / name / "model")) for name in ("given", "prepass"))
    for a, b in zip(given.parameters(), prepass.parameters()):
        assert float((a - b).detach().abs().max()) <= 1e-5
