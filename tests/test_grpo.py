"""The grpo flow and fastalign.rewards: end to end, a seeded run raises the verifier reward, one step's loss and
gradients against the formulas on materialized float64 logits, beta = 0 holds no reference model, 2 gloo
processes give the 1-process step, reward sources and their errors, bad configs."""

import gc
import json
import math
import random
import shutil
import textwrap

import pytest
import torch
from conftest import one_and_two_processes

from fastalign import cli
from fastalign.data import loading
from fastalign.engine.config import GRPOConfig, SFTConfig, load_config
from fastalign.engine.distributed import DistState
from fastalign.engine.generation import HFSampler
from fastalign.engine.logging import read_metrics
from fastalign.engine.trainer import accumulate_gradients
from fastalign.flows import grpo
from fastalign.losses import FusedLinearGRPOLoss
from fastalign.models.heads import PolicyValueModel
from fastalign.models.loading import load_causal_lm, load_tokenizer
from fastalign.rewards import RewardError, build_rewards

SMALL = dict(max_steps=2, batch_size=4, num_generations=4, num_examples=16, num_eval_examples=4, progress=False,
             threads=1, max_length=48)
LIVE_MODEL_PARAMETERS = []


def count_live_models_reward(prompts, completions, **columns):
    """A user reward function that records the parameters of every causal LM alive while the flow runs."""
    from transformers import PreTrainedModel

    gc.collect()
    models = [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
    params = {id(p): p for m in models for p in m.parameters()}  # a trunk inside its causal LM counts once
    LIVE_MODEL_PARAMETERS.append(sum(p.numel() for p in params.values()))
    return [float(len(c)) for c in completions]


def length_reward(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def nan_on_seven(prompts, completions, answer, **columns):
    return [math.nan if "7" in p else 1.0 for p in prompts]


def raise_on_seven(prompts, completions, **columns):
    if any("7" in p for p in prompts):
        raise KeyError("no seven")
    return [0.0] * len(prompts)


def _cfg(tmp_path, name, **over):
    return load_config(GRPOConfig, overrides=dict(SMALL, output_dir=str(tmp_path), name=name, **over))


# ------------------------------------------------------------------------------------ end to end
def test_grpo_flow_end_to_end_with_reference_and_iterations(tmp_path):
    report = grpo.run(_cfg(tmp_path, "run", beta=0.05, num_iterations=2, max_steps=4, advantage="rloo",
                           loss_type="grpo", epsilon_high=0.28, micro_batch_size=8, dataset="arith+pronoun",
                           rewards="verifier,test_grpo:length_reward", reward_weights="1.0,0.01"))
    run = tmp_path / "run"
    for f in ("config.yaml", "metrics.jsonl", "eval.json", "model/config.json"):
        assert (run / f).exists(), f
    assert json.loads((run / "eval.json").read_text()) == report
    for key in ("arith/exact_match", "pronoun/neutral_rate", "kl_to_start", "start/arith/exact_match"):
        assert math.isfinite(report[key]), key
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "reward", "kl", "entropy", "grad_norm", "clip_ratio/region_mean", "reward/verifier",
                "reward/test_grpo:length_reward"):
        assert all(math.isfinite(r[key]) for r in rows), key
    # Step 1 samples from the start = the reference: no KL, ratio 1 (stored log-probs = the policy's).
    assert abs(rows[0]["kl"]) < 1e-5 and abs(rows[0]["approx_kl"]) < 1e-8
    # Steps 1-2 share a rollout, so its reward is logged twice; step 2 trains with moved weights: ratio != 1.
    assert rows[0]["reward"] == rows[1]["reward"] and rows[1]["approx_kl"] > 0
    assert report["parameters"]["reference"] == report["parameters"]["policy"]
    trained, start = load_causal_lm(str(run / "model")), load_causal_lm("tiny")
    assert max((a - b).abs().max().item() for a, b in zip(trained.parameters(), start.parameters())) > 0


def _checkpoint_only_run(tmp_path, straight, step, name):
    """A run folder holding only ``straight``'s checkpoint of ``step``: a run that crashed right after writing it."""
    from fastalign.engine import checkpoint as ckpt

    folder = f"step-{step:07d}"
    shutil.copytree(tmp_path / straight / "checkpoints" / folder, tmp_path / name / "checkpoints" / folder)
    (tmp_path / name / "checkpoints" / "latest").write_text(folder)
    assert ckpt.latest_checkpoint(tmp_path / name).name == folder


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.mark.parametrize("crash_after", [1, 2])
def test_resume_gives_the_uninterrupted_weights(tmp_path, crash_after):
    """Resuming after step 1 (the rollout's second use still pending) or step 2 (a new rollout next) reproduces the
    straight run: same weights, same logged rewards."""
    over = dict(max_steps=4, num_iterations=2, beta=0.05, save_every=1, keep_checkpoints=4, lr=1e-3)
    grpo.run(_cfg(tmp_path, "straight", **over))
    _checkpoint_only_run(tmp_path, "straight", crash_after, "resumed")
    grpo.run(_cfg(tmp_path, "resumed", resume=True, **over))
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    logged = {r["step"]: r["reward"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")}
    assert sorted(logged) == list(range(crash_after + 1, 5))
    assert all(logged[r["step"]] == r["reward"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")
               if r["step"] in logged)


def test_beta_zero_holds_no_reference_model(tmp_path):
    policy = sum(p.numel() for p in load_causal_lm("tiny").parameters())
    gc.collect()
    for beta, copies in ((0.0, 1), (0.1, 2)):
        LIVE_MODEL_PARAMETERS.clear()
        report = grpo.run(_cfg(tmp_path, f"b{beta}", beta=beta, max_steps=1,
                               rewards="test_grpo:count_live_models_reward"))
        # While training (the reward runs mid-rollout): the policy alone, or the policy and its frozen copy.
        assert LIVE_MODEL_PARAMETERS and set(LIVE_MODEL_PARAMETERS) == {copies * policy}, LIVE_MODEL_PARAMETERS
        assert report["parameters"] == {"policy": policy, "reference": (copies - 1) * policy}
        assert (report["reference"] is None) == (beta == 0)


# --------------------------------------------------------------------------- reward rises, seeded
@pytest.fixture(scope="module")
def pronoun_sft(tmp_path_factory):
    """A tiny model briefly SFT-trained on pronoun: stereotyped his/her, and "their" where the prompt is tagged."""
    from fastalign.flows import sft

    root = tmp_path_factory.mktemp("grpo_sft")
    sft.run(load_config(SFTConfig, overrides=dict(dataset="pronoun", num_examples=256, max_steps=40, batch_size=32,
                                                  lr=3e-3, warmup_steps=5, progress=False, threads=1, max_length=48,
                                                  num_eval_examples=4, output_dir=str(root), name="sft")))
    return str(root / "sft" / "model")


def test_seeded_grpo_run_raises_the_verifier_reward(tmp_path, pronoun_sft):
    report = grpo.run(_cfg(tmp_path, "rise", init_from=pronoun_sft, dataset="pronoun", num_examples=64,
                           max_steps=12, batch_size=8, num_generations=8, lr=1e-3, seed=3))
    rewards = [r["pronoun/verifier_reward"] for r in read_metrics(tmp_path / "rise" / "metrics.jsonl")]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.15, rewards
    assert report["pronoun/neutral_rate"] >= report["start/pronoun/neutral_rate"]


# ------------------------------------------------------------------- one step against the formulas
def _float64_step(lm, batch, *, loss_type, beta, eps_low, eps_high, temperature, max_len):
    """The GRPO loss of ANCHORS.md on materialized float64 logits, and its gradients (autograd)."""
    lm64 = load_causal_lm("tiny").double()
    lm64.load_state_dict({k: v.double() for k, v in lm.state_dict().items()})
    logits = lm64(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1] / temperature
    target = batch.labels[:, 1:]
    m = (target != -100).double()
    logp = torch.log_softmax(logits, -1).gather(2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * m
    old = batch.old_logps.double()
    ratio = torch.exp(logp - old)
    adv = batch.advantages.double()[:, None]
    term = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    if beta:
        d = batch.ref_logps.double() - logp
        term = term + beta * (torch.exp(d) - d - 1)
    term = term * m
    if loss_type == "grpo":
        loss = (term.sum(1) / m.sum(1)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = term.sum() / m.sum()
    else:
        loss = term.sum() / (m.shape[0] * max_len)
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in lm64.named_parameters()}


@pytest.mark.parametrize("share_prompts", [True, False], ids=["shared_prompt_forward", "full_rows"])
@pytest.mark.parametrize("loss_type, beta", [("grpo", 0.0), ("bnpo", 0.1), ("dr_grpo", 0.0), ("dapo", 0.2)])
def test_one_step_loss_and_gradients_equal_the_formula(loss_type, beta, share_prompts):
    """Micro-batches of 5 and 7 rows split the groups of 4: the shared-prompt forward also sees partial groups."""
    torch.set_num_threads(1)
    tok, lm = load_tokenizer("tiny"), load_causal_lm("tiny")
    temperature = random.choice([1.0, 0.8])
    cfg = load_config(GRPOConfig, overrides=dict(num_generations=4, batch_size=3, max_new_tokens=6,
                                                 temperature=temperature, loss_type=loss_type, beta=beta,
                                                 epsilon=0.2, epsilon_high=0.28, num_iterations=2, dataset="arith",
                                                 share_prompt_forward=share_prompts))
    policy = PolicyValueModel(lm)
    rewards = build_rewards(["test_grpo:length_reward"])  # the random tiny model's verifier reward is all 0
    rows = loading.load_rows("arith", "prompts", n=8, seed=random.randrange(1000))[:3]
    make = grpo.make_rollout(policy, HFSampler(lm, tok), rewards, None, tok, cfg, DistState())
    batch, _ = make(rows, torch.Generator().manual_seed(random.randrange(10**6)))
    mask = batch.labels[:, 1:] != -100
    # Old log-probs away from the current ones, so some ratios leave [1 - ε_low, 1 + ε_high]; a reference too.
    batch.old_logps = torch.where(mask, batch.old_logps + 0.3 * torch.randn(mask.shape), torch.zeros(()))
    batch.ref_logps = torch.where(mask, batch.old_logps - 0.2 * torch.rand(mask.shape), torch.zeros(()))
    batch.advantages = torch.randn(batch.advantages.shape)

    loss_module = FusedLinearGRPOLoss(beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
                                      temperature=temperature, max_completion_length=6)
    loss_fn, weight_fn = grpo.grpo_loss_fn(loss_module, cfg)
    n = batch.input_ids.shape[0]
    # The trainer's accumulation over micro-batches (bnpo: one, its normalizer is the micro-batch's tokens).
    micro = [batch] if loss_type == "bnpo" else [batch.rows(torch.arange(0, 5)), batch.rows(torch.arange(5, n))]
    metrics, _ = accumulate_gradients(policy, micro, loss_fn, weight_fn, DistState())
    loss64, grads64 = _float64_step(lm, batch, loss_type=loss_type, beta=beta, eps_low=0.2, eps_high=0.28,
                                    temperature=temperature, max_len=6)
    assert math.isfinite(metrics["loss"])
    assert abs(metrics["loss"] - float(loss64)) <= 1e-5 * abs(float(loss64)) + 1e-7
    for k, p in lm.named_parameters():
        g, e = p.grad.double(), grads64[k]
        assert torch.isfinite(g).all(), k
        assert float((g - e).norm()) <= 1e-5 * float(e.norm()) + 1e-10, k


def test_shared_prompt_forward_equals_the_full_forward():
    """Rows of repeated prompts (lengths 1..7) with completions of 0..5 tokens, in random order: the completion
    hidden states of the shared-prompt forward equal those of the full forward, and their gradients too."""
    from fastalign.models.heads import completion_aligned

    lm = load_causal_lm("tiny").double()
    policy = PolicyValueModel(lm)
    prompts = [[1] + [random.randrange(3, 99) for _ in range(random.randrange(0, 7))] for _ in range(3)]
    rows = [(p, [random.randrange(3, 99) for _ in range(random.randrange(0, 6))]) for p in prompts for _ in range(3)]
    random.shuffle(rows)
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (p, c) in enumerate(rows):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        mask[i, :len(p) + len(c)] = 1
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
    batch = grpo.GRPOBatch(ids, mask, labels, torch.zeros(len(rows)))
    plen = grpo.prompt_lengths(batch)
    assert plen.tolist() == [len(p) for p, _ in rows]
    weights = torch.randn(len(rows), width, lm.config.hidden_size, dtype=torch.float64)

    full, _ = policy(ids, mask)
    shared, _ = policy(ids, mask, prompt_lengths=plen)
    (labels_c,) = completion_aligned(plen, shared.shape[1], labels[:, 1:])
    used = labels_c != -100
    assert int(used.sum()) == int((labels != -100).sum())
    picked = full[:, :-1].gather(1, (plen[:, None] - 1 + torch.arange(shared.shape[1])).clamp(max=width - 2)
                                 [..., None].expand(-1, -1, full.shape[-1]))
    assert float((picked - shared)[used].abs().max()) < 1e-10
    grads = []
    for hidden in (picked, shared):
        lm.zero_grad()
        (hidden * weights[:, :hidden.shape[1]] * used[..., None]).sum().backward(retain_graph=True)
        grads.append({k: p.grad.clone() for k, p in lm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:  # float64 model, but transformers computes the RoPE angles in float32: ~1e-7 apart
        assert float((grads[0][k] - grads[1][k]).norm()) <= 1e-6 * (1e-12 + float(grads[0][k].norm())), k
    with pytest.raises(ValueError, match="value head"):
        PolicyValueModel(lm, value_head=True)(ids, mask, prompt_lengths=plen)


# ------------------------------------------------------------------------------ 2 processes = 1
WORKER = textwrap.dedent('''
    import sys
    import torch
    from fastalign.data import loading
    from fastalign.engine.config import GRPOConfig, load_config
    from fastalign.engine.distributed import DistState, init_distributed, shutdown, unwrap, wrap_model
    from fastalign.engine.generation import HFSampler
    from fastalign.engine.trainer import accumulate_gradients
    from fastalign.flows import grpo
    from fastalign.losses import FusedLinearGRPOLoss
    from fastalign.models.heads import PolicyValueModel
    from fastalign.models.loading import load_causal_lm, load_tokenizer
    from fastalign.rewards import build_rewards

    out, seed = sys.argv[1], int(sys.argv[2])
    state = init_distributed()
    torch.set_num_threads(1)
    tok, lm = load_tokenizer("tiny"), load_causal_lm("tiny")
    with torch.no_grad():  # weights that differ from the cached tiny model, the same on every process
        g = torch.Generator().manual_seed(seed)
        for p in lm.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    rows = loading.load_rows("arith", "prompts", n=8, seed=seed)[:4]
    results = {}
    for loss_type, advantage in (("dapo", "batch"), ("grpo", "group")):
        cfg = load_config(GRPOConfig, overrides=dict(num_generations=4, batch_size=4, max_new_tokens=5,
                                                     loss_type=loss_type, advantage=advantage, beta=0.1))
        policy = PolicyValueModel(lm)
        # The same whole rollout on every process (one seeded sampling, one process's view) ...
        make = grpo.make_rollout(policy, HFSampler(lm, tok), build_rewards(["test_grpo:length_reward"]), None, tok,
                                 cfg, DistState())
        full, _ = make(rows, torch.Generator().manual_seed(seed))
        mask = full.labels[:, 1:] != -100
        full.ref_logps = torch.where(mask, -torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed)),
                                     torch.zeros(()))
        # ... each process keeps its groups and their rewards (here: completion lengths) and computes the
        # advantages (batch std: over all-gathered rewards).
        per = full.input_ids.shape[0] // state.world_size
        mine = full.rows(torch.arange(state.rank * per, (state.rank + 1) * per))
        local_rewards = mask.sum(1).float()[state.rank * per:(state.rank + 1) * per]
        mine.advantages = grpo.compute_advantages(local_rewards, 4, advantage, state)
        model = wrap_model(policy, state)
        loss_fn, weight_fn = grpo.grpo_loss_fn(FusedLinearGRPOLoss(beta=0.1, loss_type=loss_type,
                                                                   max_completion_length=5), cfg)
        micro = [mine.rows(torch.arange(i, min(i + 4, per))) for i in range(0, per, 4)]
        metrics, _ = accumulate_gradients(model, micro, loss_fn, weight_fn, state)
        results[loss_type] = (metrics, {k: p.grad.clone() for k, p in unwrap(model).named_parameters()})
        unwrap(model).zero_grad(set_to_none=True)
    if state.is_main:
        torch.save(results, out)
    shutdown(state)
''')


def test_two_gloo_processes_match_one_process(tmp_path):
    # The same script in this process (world size 1) is the reference.
    one, two = one_and_two_processes(WORKER, tmp_path, random.randrange(10**6))
    for name in ("dapo", "grpo"):
        (m1, g1), (m2, g2) = one[name], two[name]
        assert m1.keys() == m2.keys()
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5, abs=1e-7), name
        for k in g1:
            a, b = g1[k].double(), g2[k].double()
            assert torch.isfinite(b).all()
            assert float((a - b).norm()) <= 1e-5 * float(a.norm()) + 1e-9, (name, k)
        assert any(float(g.norm()) > 0 for g in g1.values())


# --------------------------------------------------------------------------------------- rewards
def test_reward_sources_weighted_and_model_folder(tmp_path):
    from fastalign.flows import reward

    rows = loading.load_rows("arith+pronoun", "prompts", n=3, seed=random.randrange(1000))
    texts = [r.get("answer", "their") if i % 2 else "xx" for i, r in enumerate(rows)]
    w = random.uniform(0.1, 2.0)
    total, parts = build_rewards(["verifier", "test_grpo:length_reward"], [1.0, w]).score(rows, texts)
    expected_verifier = [1.0 if i % 2 else 0.0 for i in range(len(rows))]
    assert parts["verifier"].tolist() == expected_verifier
    assert torch.allclose(total, torch.tensor(expected_verifier) + w * torch.tensor([float(len(t)) for t in texts]))
    # A trained reward model folder scores prompt + completion like the reward flow's model does.
    from fastalign.engine.config import RewardConfig

    reward.run(load_config(RewardConfig, overrides=dict(max_steps=1, batch_size=4, num_examples=8, num_eval_examples=2,
                                                        progress=False, threads=1, max_length=48,
                                                        output_dir=str(tmp_path), name="rm")))
    tok = load_tokenizer("tiny")
    rm = build_rewards([str(tmp_path / "rm" / "model")], tokenizer=tok)
    scores, _ = rm.score(rows, texts)
    from fastalign.models.heads import ScalarHeadModel

    model = ScalarHeadModel.load(tmp_path / "rm" / "model")
    for i, (r, t) in enumerate(zip(rows, texts)):
        ids = loading.encode_prompt(tok, r["prompt"]) + loading.encode_completion(tok, t)
        with torch.no_grad():
            one = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        assert float(scores[i]) == pytest.approx(float(one), rel=1e-5, abs=1e-6)


def test_reward_errors_name_the_prompt():
    rows = [{"prompt": "1+2=", "answer": "3", "task": "arith"}, {"prompt": "7+1=", "answer": "8", "task": "arith"}]
    with pytest.raises(RewardError, match="reward 'test_grpo:nan_on_seven' gave nan for prompt 1 \\('7\\+1='\\)"):
        build_rewards(["test_grpo:nan_on_seven"]).score(rows, ["3", "8"])
    with pytest.raises(RewardError, match="raised KeyError: 'no seven' on prompt 1 \\('7\\+1='\\)"):
        build_rewards(["test_grpo:raise_on_seven"]).score(rows, ["3", "8"])
    with pytest.raises(RewardError, match="needs rows of a built-in task .* prompt 0 \\('hi'\\) has task None"):
        build_rewards(["verifier"]).score([{"prompt": "hi"}], ["x"])
    with pytest.raises(RewardError, match="must return 2 numbers"):
        build_rewards([lambda prompts, completions, **kw: [1.0]]).score(rows, ["3", "8"])
    with pytest.raises(ValueError, match="could not import 'nope' from module 'test_grpo'"):
        build_rewards(["test_grpo:nope"])
    with pytest.raises(ValueError, match="neither 'verifier', an existing reward model folder, nor 'module:function'"):
        build_rewards(["verifyer"])
    with pytest.raises(ValueError, match="one weight per reward \\(2\\), got 1"):
        build_rewards(["verifier", "test_grpo:length_reward"], [1.0])


# ------------------------------------------------------------------------------------- bad config
@pytest.mark.parametrize("over, message", [
    (dict(num_generations=1), "'num_generations' must be >= 2, got 1"),
    (dict(temperature=0.0), "'temperature' must be > 0"),
    (dict(epsilon=1.0), "'epsilon' must be in \\[0, 1\\), got 1.0"),
    (dict(loss_type="ppo"), "'loss_type' must be one of \\['grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo'\\], got 'ppo'"),
    (dict(advantage="gae"), "'advantage' must be one of \\['group', 'batch', 'none', 'rloo', 'reinforce_pp', "
                            "'reinforce_pp_baseline'\\], got 'gae'"),
    (dict(rewards=""), "'rewards' must name at least one reward source"),
    (dict(reward_weights="1,2"), "'reward_weights' must have one weight per reward \\(1\\), got 2"),
    (dict(reward_weights="x"), "'reward_weights' must hold finite numbers, got 'x'"),
    (dict(batch_size=3, num_generations=4, micro_batch_size=5), "'micro_batch_size' must divide .* = 12\\), got 5"),
    (dict(beta=0.1, reference="shared_trunk", temperature=0.7), "'temperature' must be 1 with reference"),
    (dict(fsdp=True, beta=0.1, reference="shared_trunk"), "'reference' shared_trunk is not supported by grpo"),
    (dict(fsdp=True, reference_offload=True), "'reference_offload' does not apply with fsdp in grpo"),
    (dict(fsdp_offload=True), "'fsdp_offload' needs fsdp: true"),
])
def test_bad_config_names_the_key(over, message):
    with pytest.raises(ValueError, match=message):
        load_config(GRPOConfig, overrides=over)


def test_cli_grpo_reports_a_bad_key(capsys):
    assert cli.main(["grpo", "--num_generation", "4"]) == 1
    err = capsys.readouterr().err
    assert "unknown config key 'num_generation'" in err and "did you mean 'num_generations'" in err
