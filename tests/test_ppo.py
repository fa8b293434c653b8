"""The ppo flow: end to end with both value-model options, its advantages against ops.gae/ops.whiten and
a float64 loop on a recorded rollout, the KL controllers, reward-model offload, bad configs."""

import json
import math
import random
import shutil

import pytest
import torch

from fastalign import cli, ops
from fastalign.engine.config import PPOConfig, RewardConfig, load_config
from fastalign.engine.logging import read_metrics
from fastalign.flows import ppo
from fastalign.models.heads import CausalLMLogprobs, PolicyValueModel, ScalarHeadModel, TokenValueModel
from fastalign.models.loading import load_causal_lm, load_tokenizer, module_bytes
from fastalign.models.offload import OffloadedModel
from fastalign.models.reference import FrozenCopy

SMALL = dict(max_steps=2, batch_size=8, mini_batch_size=4, ppo_epochs=2, num_examples=16, num_eval_examples=4,
             progress=False, threads=1, max_length=48)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A (briefly trained) reward model folder from the reward flow, as PPO gets it in the pipeline."""
    from fastalign.flows import reward

    root = tmp_path_factory.mktemp("ppo_rm")
    reward.run(load_config(RewardConfig, overrides=dict(max_steps=1, batch_size=4, num_examples=8, num_eval_examples=2,
                                                        progress=False, threads=1, warmup_steps=0, max_length=48,
                                                        output_dir=str(root), name="rm")))
    return str(root / "rm" / "model")


def _cfg(tmp_path, reward_model_dir, name, **over):
    return load_config(PPOConfig, overrides=dict(SMALL, output_dir=str(tmp_path), name=name,
                                                  reward_model=reward_model_dir, **over))


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("value_model, extra", [
    ("separate", dict(kl_estimator="k1", reward_offload=True)),
    ("policy_trunk", dict(kl_estimator="k3", kl_target=0.5, kl_horizon=100)),
    ("policy_trunk", dict(reference="shared_trunk", trainable_top_layers=1)),
    ("separate", dict(reference="adapter", lora_r=4, lr=1e-3)),
])
def test_ppo_flow_end_to_end(tmp_path, reward_model_dir, value_model, extra):
    report = ppo.run(_cfg(tmp_path, reward_model_dir, "run", value_model=value_model, **extra))
    run = tmp_path / "run"
    for f in ("config.yaml", "metrics.jsonl", "eval.json", "model/config.json"):
        assert (run / f).exists(), f
    assert json.loads((run / "eval.json").read_text()) == report
    for key in ("arith/exact_match", "pronoun/neutral_rate", "kl_to_start", "eval_learned_reward",
                "eval_verifier_reward", "start/eval_learned_reward", "start/eval_verifier_reward",
                "eval_sampled_learned_reward", "eval_sampled_verifier_reward", "eval_sampled_pronoun/neutral_rate",
                "start/eval_sampled_learned_reward", "start/eval_sampled_verifier_reward/arith",
                "start/arith/exact_match", "start/pronoun/stereotype_rate"):
        assert math.isfinite(report[key]), key

    # Memory by role: the policy is the whole tiny LM; the value model is a whole trunk or one Linear(H, 1).
    lm = load_causal_lm("tiny")
    lm_mib = module_bytes(lm) / 2**20
    mem = report["memory_mib"]
    reference = extra.get("reference", "frozen_copy")
    if reference == "adapter":  # LoRA weights on the policy; the reference is the same weights, adapters off
        assert mem["policy"] > lm_mib and mem["reference"] == 0
    else:
        assert mem["policy"] == pytest.approx(lm_mib)
        held = lm if reference == "frozen_copy" else lm.model.layers[-1]  # shared_trunk: a copy of the top layer
        assert mem["reference"] == pytest.approx(module_bytes(held) / 2**20)
    assert mem["reward_model"] == pytest.approx(lm_mib + (128 + 1) * 4 / 2**20)
    expected_value = mem["reward_model"] if value_model == "separate" else (128 + 1) * 4 / 2**20
    assert mem["value_model"] == pytest.approx(expected_value)

    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "policy_loss", "value_loss", "score", "kl", "kl_coef", "clip_ratio/region_mean", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in rows), key
    # The first rollout is sampled from the starting policy, which is the reference: no KL at all.
    assert abs(rows[0]["kl"]) < 1e-5
    if extra.get("kl_target"):  # KL 0 < target: the adaptive controller lowers β by the clipped 20% step
        assert rows[1]["kl_coef"] == pytest.approx(0.05 * (1 - 0.2 * 8 / 100))
    else:
        assert rows[1]["kl_coef"] == 0.05
    # The policy trained: the saved model differs from the start.
    trained = load_causal_lm(str(run / "model"))
    moved = max((a - b).abs().max().item() for a, b in zip(trained.parameters(), lm.parameters()))
    assert moved > 0


# ------------------------------------------------------------------------------- held-out rewards
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_heldout_rewards_score_each_completion_alone(tmp_path, reward_model_dir, temperature):
    """The batched, padded scoring of held-out completions equals the reward model and the verifier applied to
    each prompt + completion alone; sampled completions repeat exactly under the same generator seed."""
    from fastalign.data import loading, tasks
    from fastalign.engine.generation import decode, generate, sample
    from fastalign.models.heads import IGNORE_INDEX

    cfg = _cfg(tmp_path, reward_model_dir, "h", eval_batch_size=random.choice([2, 3, 64]))
    tok, lm = load_tokenizer("tiny"), load_causal_lm("tiny")
    rm = OffloadedModel(ScalarHeadModel.load(reward_model_dir), "cpu", offload=False)
    seed = random.randrange(10**6)
    rows = loading.load_rows("pronoun+arith", "prompts", n=random.randint(2, 4), seed=seed, split="eval")
    gen = lambda: torch.Generator().manual_seed(seed)
    out = ppo.heldout_rewards(lm, rm, tok, rows, cfg, "cpu", temperature=temperature, generator=gen())
    prefix = "eval_sampled_" if temperature else "eval_"
    assert out == ppo.heldout_rewards(lm, rm, tok, rows, cfg, "cpu", temperature=temperature, generator=gen())

    expected_scores, expected_verifier, g = {}, {}, gen()
    for name in ("arith", "pronoun"):  # the function's order: tasks sorted by name, one sampling call each
        group = [r for r in rows if r["task"] == name]
        ids = [loading.encode_prompt(tok, r["prompt"]) for r in group]
        new = tasks.get_task(name).max_new_tokens
        done = (sample(lm, tok, ids, max_new_tokens=new, temperature=temperature, batch_size=cfg.eval_batch_size,
                       generator=g).completions() if temperature else generate(lm, tok, ids, max_new_tokens=new))
        expected_scores[name] = [float(rm(torch.tensor([p + c]), torch.ones(1, len(p + c), dtype=torch.long)))
                                 for p, c in zip(ids, done)]
        expected_verifier[name] = [tasks.get_task(name).reward(r, t) for r, t in zip(group, decode(tok, done))]
        assert all(c and IGNORE_INDEX not in c for c in done)
    all_scores = expected_scores["arith"] + expected_scores["pronoun"]
    all_verifier = expected_verifier["arith"] + expected_verifier["pronoun"]
    assert out[prefix + "learned_reward"] == pytest.approx(sum(all_scores) / len(all_scores), rel=1e-5, abs=1e-6)
    assert out[prefix + "verifier_reward"] == pytest.approx(sum(all_verifier) / len(all_verifier), abs=1e-12)
    for name in ("arith", "pronoun"):
        n = len(expected_scores[name])
        assert out[f"{prefix}learned_reward/{name}"] == pytest.approx(sum(expected_scores[name]) / n, rel=1e-5,
                                                                     abs=1e-6)
        assert out[f"{prefix}verifier_reward/{name}"] == pytest.approx(sum(expected_verifier[name]) / n, abs=1e-12)
    if temperature:  # the tasks' own rates of the samples; the pronoun verifier rewards exactly the neutral answer
        assert out["eval_sampled_pronoun/neutral_rate"] == out["eval_sampled_verifier_reward/pronoun"]
        assert out["eval_sampled_arith/exact_match"] == out["eval_sampled_verifier_reward/arith"]
    else:
        assert not any(k.startswith("eval_sampled") for k in out)


# ------------------------------------------------------------------------- advantages on a rollout
def _float64_advantages(rollout, kl_coef, kl_estimator, gamma, lam):
    """TRL's per-timestep GAE loop over each row's completion tokens, then whitening, in float64."""
    adv_rows, ret_rows = [], []
    for b in range(rollout.mask.shape[0]):
        pos = rollout.mask[b].nonzero().flatten().tolist()
        d = (rollout.ref_logps[b, pos] - rollout.logps[b, pos]).double()
        kl = -d if kl_estimator == "k1" else torch.exp(d) - d - 1
        r = -kl_coef * kl
        r[-1] += float(rollout.scores[b])
        v = rollout.values[b, pos].double()
        adv, last = torch.zeros_like(r), 0.0
        for t in reversed(range(len(pos))):
            next_v = v[t + 1] if t + 1 < len(pos) else 0.0
            last = r[t] + gamma * next_v - v[t] + gamma * lam * last
            adv[t] = last
        adv_rows.append(adv)
        ret_rows.append(adv + v)
    flat = torch.cat(adv_rows)
    white = (flat - flat.mean()) / torch.sqrt(flat.var(unbiased=True) + 1e-8)
    return white, torch.cat(ret_rows)


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_advantages_on_a_recorded_rollout_match_ops_and_float64(tmp_path, reward_model_dir, kl_estimator):
    cfg = _cfg(tmp_path, reward_model_dir, "adv", batch_size=12, max_new_tokens=7, dataset="arith+pronoun")
    tokenizer = load_tokenizer("tiny")
    lm = load_causal_lm("tiny")
    reference = FrozenCopy(CausalLMLogprobs(lm))
    with torch.no_grad():  # move the policy off the reference so the KL term is not zero
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    policy = PolicyValueModel(lm)
    critic = TokenValueModel(ScalarHeadModel.load(reward_model_dir))
    reward_model = OffloadedModel(ScalarHeadModel.load(reward_model_dir), "cpu", offload=False)
    from fastalign.data import tasks

    rows = tasks.task_rows("arith+pronoun", "prompts", 6, seed=random.randrange(1000))
    rollout = ppo.sample_rollout(policy, critic, reference, reward_model, tokenizer, rows, cfg, torch.device("cpu"))

    # The mask selects exactly the sampled completion tokens; the sampling-time log-probs are the policy's.
    lengths = rollout.batch.attention_mask.sum(1)
    prompt_lengths = (rollout.batch.labels == -100).logical_and(rollout.batch.attention_mask.bool()).sum(1)
    assert torch.equal(rollout.mask.sum(1), lengths - prompt_lengths)
    expected_logps = CausalLMLogprobs(lm)(rollout.batch.input_ids, rollout.batch.attention_mask, rollout.batch.labels)
    assert torch.equal(rollout.logps, expected_logps.detach())
    assert float((rollout.logps - rollout.ref_logps).abs().max()) > 0

    kl_coef, gamma, lam = random.uniform(0.01, 0.5), random.uniform(0.9, 1.0), random.uniform(0.8, 1.0)
    rewards, kl = ppo.token_rewards(rollout.scores, rollout.logps, rollout.ref_logps, rollout.mask, kl_coef=kl_coef,
                                    kl_estimator=kl_estimator)
    advantages, returns = ppo.advantages_and_returns(rewards, rollout.values, rollout.mask, gamma=gamma, lam=lam)

    # The flow's advantages are ops.gae then ops.whiten on the same rollout ...
    gae_adv, gae_ret = ops.gae(rewards, rollout.values, rollout.mask, gamma=gamma, lam=lam)
    assert torch.equal(advantages, ops.whiten(gae_adv, rollout.mask))
    assert torch.equal(returns, gae_ret)
    # ... and both are the textbook recursion over each row's completion tokens (float64).
    white64, returns64 = _float64_advantages(rollout, kl_coef, kl_estimator, gamma, lam)
    m = rollout.mask
    assert not torch.isnan(advantages).any()
    assert (advantages[m].double() - white64).abs().max() / white64.abs().max() < 1e-5
    assert (returns[m].double() - returns64).abs().max() / returns64.abs().max() < 1e-5
    assert float(advantages[~m].abs().max()) == 0.0 and float(returns[~m].abs().max()) == 0.0


def test_token_rewards_place_the_score_on_the_last_completion_token():
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    logps, ref = -torch.rand(3, 5), -torch.rand(3, 5)
    scores = torch.randn(3)
    rewards, kl = ppo.token_rewards(scores, logps, ref, mask, kl_coef=0.1, kl_estimator="k1")
    expected = torch.where(mask, -0.1 * (logps - ref), torch.zeros(()))
    expected[0, 3] += scores[0]
    expected[1, 2] += scores[1]
    expected[2, 4] += scores[2]
    assert torch.allclose(rewards, expected, atol=1e-6, rtol=0)
    assert torch.equal(kl, torch.where(mask, logps - ref, torch.zeros(())))
    with pytest.raises(ValueError, match="mask must select at least one completion token"):
        ppo.token_rewards(scores, logps, ref, mask & torch.tensor([[1], [0], [1]], dtype=torch.bool), kl_coef=0.1)


# ---------------------------------------------------------------------------------- KL controller
def test_adaptive_kl_controller_follows_ziegler_update_rule():
    beta, target, horizon = random.uniform(0.01, 1), random.uniform(0.5, 5), random.randint(100, 20000)
    ctl = ppo.AdaptiveKLController(beta, target, horizon)
    expected = beta
    for kl in (target * 3, target * 1.1, target, target * 0.95, 0.0, target * 0.5):
        n = random.randint(1, 512)
        error = min(max(kl / target - 1, -0.2), 0.2)
        expected *= 1 + error * n / horizon
        assert ctl.update(kl, n) == pytest.approx(expected, rel=1e-12)
        assert ctl.value == pytest.approx(expected, rel=1e-12)
    # β rises while the KL is above target and falls below it.
    up, down = ppo.AdaptiveKLController(0.1, 1.0, 1000), ppo.AdaptiveKLController(0.1, 1.0, 1000)
    assert up.update(2.0, 64) > 0.1 > down.update(0.5, 64)
    fixed = ppo.FixedKLController(0.3)
    assert fixed.update(100.0, 64) == 0.3 == fixed.value
    with pytest.raises(ValueError, match="target must be > 0"):
        ppo.AdaptiveKLController(0.1, 0.0, 100)


def test_kl_controller_from_config(tmp_path, reward_model_dir):
    assert isinstance(ppo.kl_controller(_cfg(tmp_path, reward_model_dir, "a")), ppo.FixedKLController)
    ctl = ppo.kl_controller(_cfg(tmp_path, reward_model_dir, "b", kl_target=2.0, kl_horizon=500, kl_coef=0.2))
    assert isinstance(ctl, ppo.AdaptiveKLController) and (ctl.value, ctl.target, ctl.horizon) == (0.2, 2.0, 500)


# ---------------------------------------------------------------------------------------- offload
def test_offloaded_reward_model_runs_on_the_device_and_stays_on_cpu_between_uses():
    # The meta device stands in for an accelerator: a real second device, no data to copy.
    module = torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 1))
    module.register_buffer("scale", torch.tensor(2.0))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    seen = []
    module[1].register_forward_pre_hook(lambda mod, args: seen.append((mod.weight.device.type, args[0].device.type)))
    holder = OffloadedModel(module, "meta", offload=True)
    for _ in range(2):
        out = holder(torch.zeros(3, 4, dtype=torch.long, device="meta"))
        assert out.device.type == "meta" and out.shape == (3, 4, 1)
        # Between uses: every weight and buffer on the CPU, with its values, and no gradient.
        assert {t.device.type for t in list(module.parameters()) + list(module.buffers())} == {"cpu"}
        for k, v in module.state_dict().items():
            assert torch.equal(v, before[k]), k
    assert seen == [("meta", "meta")] * 2
    assert not any(p.requires_grad for p in module.parameters())


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("value_model, reference", [("separate", "frozen_copy"), ("policy_trunk", "shared_trunk")])
def test_resume_gives_the_uninterrupted_weights(tmp_path, reward_model_dir, value_model, reference):
    """A run that crashed right after its rollout-2 checkpoint, resumed, ends with the straight run's policy, KL
    coefficient (adaptive) and logged rollouts."""
    from safetensors.torch import load_file

    from fastalign.engine import checkpoint as ckpt

    over = dict(max_steps=4, save_every=1, keep_checkpoints=4, value_model=value_model, reference=reference,
                kl_target=1.0, kl_horizon=16, lr=1e-3)
    straight = ppo.run(_cfg(tmp_path, reward_model_dir, "straight", **over))
    folder = "step-0000002"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / folder, tmp_path / "resumed" / "checkpoints" / folder)
    (tmp_path / "resumed" / "checkpoints" / "latest").write_text(folder)
    resumed = ppo.run(_cfg(tmp_path, reward_model_dir, "resumed", resume=True, **over))
    assert resumed["final_kl_coef"] == straight["final_kl_coef"] != 0.1
    a, b = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The value weights too: the final checkpoints hold the same trained roles.
    a, b = (load_file(str(ckpt.latest_checkpoint(tmp_path / n) / "model.safetensors")) for n in ("straight", "resumed"))
    assert a.keys() == b.keys() and any("value" in k or "critic" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = {n: read_metrics(tmp_path / n / "metrics.jsonl") for n in ("straight", "resumed")}
    assert [r["step"] for r in rows["resumed"]] == [3, 4]
    assert [(r["score"], r["kl"]) for r in rows["resumed"]] == [(r["score"], r["kl"]) for r in rows["straight"][2:]]


def test_a_blown_up_update_stops_the_run_naming_the_rollout_and_the_update(tmp_path, reward_model_dir):
    """lr 1e30: Adam's first update moves every weight by ~1e30, so the rollout's second update sees a non-finite
    loss; the shared trainer stops there, before any optimizer step or checkpoint of that rollout."""
    from fastalign.engine import checkpoint as ckpt
    from fastalign.engine.trainer import TrainingDiverged

    cfg = _cfg(tmp_path, reward_model_dir, "diverged", lr=1e30, warmup_steps=0, save_every=1)
    with pytest.raises(TrainingDiverged, match=r"became (nan|inf) at step 1 \(PPO epoch 1, update 2\); training "
                                               r"stopped\. Last good checkpoint: none was written"):
        ppo.run(cfg)
    assert ckpt.latest_checkpoint(tmp_path / "diverged") is None and not (tmp_path / "diverged" / "model").exists()


# ------------------------------------------------------------------------------------- bad config
@pytest.mark.parametrize("over, message", [
    (dict(reward_model=""), "'reward_model' must name a trained reward model folder"),
    (dict(batch_size=8, mini_batch_size=3), "'mini_batch_size' must divide batch_size \\(8\\), got 3"),
    (dict(batch_size=4, mini_batch_size=8), "'mini_batch_size' must divide batch_size \\(4\\), got 8"),
    (dict(cliprange=1.0), "'cliprange' must be in \\(0, 1\\), got 1.0"),
    (dict(cliprange_value=0.0), "'cliprange_value' must be > 0"),
    (dict(temperature=0.0), "'temperature' must be > 0"),
    (dict(reference="precomputed"), "'reference' must be one of \\['frozen_copy', 'adapter', 'shared_trunk'\\]"),
    (dict(value_model="critic"), "'value_model' must be one of \\['separate', 'policy_trunk'\\], got 'critic'"),
    (dict(kl_estimator="k2"), "'kl_estimator' must be one of \\['k1', 'k3'\\], got 'k2'"),
    (dict(gamma=1.5), "'gamma' must be <= 1"),
    (dict(fsdp=True, reference="shared_trunk"), "'reference' shared_trunk is not supported by ppo with fsdp"),
    (dict(fsdp=True, reference_offload=True), "'reference_offload' does not apply with fsdp in ppo"),
    (dict(fsdp_offload=True), "'fsdp_offload' needs fsdp: true"),
])
def test_bad_config_names_the_key(over, message):
    values = {"reward_model": "some/folder", **over}
    with pytest.raises(ValueError, match=message):
        load_config(PPOConfig, overrides=values)


def test_reward_model_that_is_not_a_reward_folder_is_refused(tmp_path):
    from fastalign.models.tiny import tiny_path

    cfg = load_config(PPOConfig, overrides=dict(SMALL, output_dir=str(tmp_path), name="bad",
                                                reward_model=str(tiny_path())))
    with pytest.raises(ValueError, match="is not a reward model folder"):
        ppo.run(cfg)


def test_cli_ppo_reports_a_bad_key(capsys):
    assert cli.main(["ppo", "--reward_model", "x", "--kl_coeff", "0.1"]) == 1
    err = capsys.readouterr().err
    assert "unknown config key 'kl_coeff'" in err and "did you mean 'kl_coef'" in err


def test_example_config_loads_and_states_the_defaults():
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[1] / "configs" / "ppo.yaml"
    cfg = load_config(PPOConfig, str(path), {"reward_model": "rm/model"})
    defaults = PPOConfig(reward_model="rm/model")
    for key in yaml.safe_load(path.read_text()):
        if key not in ("name", "reward_model"):
            assert getattr(cfg, key) == getattr(defaults, key), key
