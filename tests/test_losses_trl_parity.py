"""fastalign.losses against TRL's own code (trl 1.16), run on CPU without a trainer.

TRL's trainers keep their loss math in methods that read a handful of attributes, so each test
binds the real, unmodified method (``DPOTrainer._compute_loss``, ``GRPOTrainer._compute_loss``,
``CPOTrainer.cpo_loss``/``get_batch_logps``) to a small harness object that carries exactly those
attributes, and feeds it a real tiny Llama whose LM head TRL itself fuses (``add_fused_lm_head``).
Our loss gets the same model's last hidden states and ``lm_head.weight``; values, metrics and the
gradients w.r.t. every model parameter and w.r.t. the hidden states must agree. Only the pieces
TRL buries inside a long method (the group-advantage lines of ``_generate_and_score_completions``)
or no longer ships (PPO's GAE loop, removed from TRL) are replicated here, each marked so.

Both sides compute log-probs in float32 (TRL's fused head always does); they agree to ~5e-7 and
are held to 1e-5 relative, values and gradients.
"""

from __future__ import annotations

import copy
import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head, nanmax, nanmin, nanstd  # noqa: E402, F401

from fastalign import ops  # noqa: E402
from fastalign.losses import FusedLinearDPOLoss, FusedLinearGRPOLoss, FusedLinearSimPOLoss  # noqa: E402

LOSS_TOL = 1e-5
GRAD_TOL = 1e-5
VOCAB = 61


def rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    assert torch.isfinite(got).all()
    return ((got - want).norm() / want.norm().clamp(min=1e-12)).item()


def tiny_llama(seed_shift=0.0):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # a head with some spread, so the losses are not all at their initial value
        model.lm_head.weight.mul_(8.0)
    model.train()
    return model


def perturbed_copy(model, scale=0.02):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn_like(p))
    ref.eval()
    return ref


def param_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


_ACCELERATOR = None


def accelerator():
    global _ACCELERATOR
    if _ACCELERATOR is None:
        _ACCELERATOR = accelerate.Accelerator(cpu=True)
    return _ACCELERATOR


# ----------------------------------------------------------------------------------------- DPO
class DPOHarness:
    """Just the attributes ``DPOTrainer._compute_loss`` reads, with TRL's method bound as is."""

    _compute_loss = DPOTrainer._compute_loss

    def __init__(self, model, ref_model, *, loss_type, beta, label_smoothing):
        self.model, self.ref_model = model, ref_model
        self.accelerator = accelerator()
        self.args = SimpleNamespace(gradient_checkpointing_kwargs=None)
        self.aux_loss_enabled, self.ld_alpha, self.precompute_ref_logps = False, None, False
        self.f_divergence_type = "reverse_kl"
        self.loss_types, self.loss_weights = [loss_type], [1.0]
        self.beta, self.label_smoothing, self.use_weighting = beta, label_smoothing, False
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens, self._tp_size = 0, 1


def dpo_batch(pairs, length):
    """[chosen..., rejected...] rows: a prompt then a completion, right padding; TRL's DPO collator layout."""
    rows = 2 * pairs
    input_ids = torch.zeros(rows, length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for r in range(rows):
        prompt = random.randint(1, length // 2)
        completion = random.randint(1, length - prompt)
        input_ids[r, :prompt + completion] = torch.randint(1, VOCAB, (prompt + completion,))
        attention_mask[r, :prompt + completion] = 1
        completion_mask[r, prompt:prompt + completion] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_dpo_matches_trl_dpo_trainer(loss_type):
    beta, smoothing = 0.2, (0.1 if loss_type == "robust" else 0.0)
    policy = tiny_llama()
    reference = perturbed_copy(policy, 0.05)
    batch = dpo_batch(pairs=3, length=14)

    # Ours first, on the unpatched model: its backbone's last hidden states and its head.
    hidden = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    with torch.no_grad():
        ref_hidden = reference.model(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    loss, metrics = FusedLinearDPOLoss(beta=beta, loss_type=loss_type, label_smoothing=smoothing)(
        hidden[:, :-1], policy.lm_head.weight, labels, ref_hidden=ref_hidden[:, :-1],
        ref_weight=reference.lm_head.weight)
    loss.backward()
    ours = param_grads(policy)
    policy.zero_grad()

    # TRL: its fused head on the same models, its loss method.
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(reference)
    harness = DPOHarness(policy, reference, loss_type=loss_type, beta=beta, label_smoothing=smoothing)
    trl_loss = harness._compute_loss(policy, batch, return_outputs=False)
    trl_loss.backward()
    theirs = param_grads(policy)

    assert rel_err(loss, trl_loss) < LOSS_TOL
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert rel_err(ours[name], theirs[name]) < GRAD_TOL, name
    logged = harness._metrics["train"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "rewards/accuracies", "entropy"):
        want = logged[key][-1]
        assert abs(metrics[key].item() - want) <= 1e-4 * max(1.0, abs(want)), key


def test_dpo_first_step_is_ln2_when_policy_is_the_reference():
    policy = tiny_llama()
    batch = dpo_batch(pairs=2, length=10)
    hidden = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    loss, metrics = FusedLinearDPOLoss()(hidden[:, :-1], policy.lm_head.weight, labels,
                                         ref_hidden=hidden[:, :-1].detach())
    assert abs(loss.item() - 0.6931471805599453) < 1e-6
    assert metrics["rewards/margins"].abs().item() < 1e-6


# --------------------------------------------------------------------------------------- SimPO
class CPOHarness:
    """The attributes ``CPOTrainer.cpo_loss`` reads; TRL's SimPO is CPO with ``loss_type="simpo"``."""

    cpo_loss = CPOTrainer.cpo_loss
    get_batch_logps = staticmethod(CPOTrainer.get_batch_logps)

    def __init__(self, *, beta, gamma, label_smoothing):
        self.alpha, self.loss_type = 0.0, "simpo"
        self.beta, self.simpo_gamma, self.label_smoothing = beta, gamma, label_smoothing
        self.accelerator = accelerator()


def test_simpo_matches_trl_cpo_simpo():
    pairs, t, h = 3, 12, 24
    beta, gamma, smoothing, cpo_alpha = 2.5, 0.8, 0.1, 0.4
    hidden = (torch.randn(2 * pairs, t, h) * 0.7).requires_grad_()
    weight = (torch.randn(VOCAB, h) * 0.4).requires_grad_()
    labels = dpo_batch(pairs, t + 1)
    labels = labels["input_ids"].masked_fill(labels["completion_mask"] == 0, -100)[:, 1:]

    loss, metrics = FusedLinearSimPOLoss(beta=beta, gamma=gamma, label_smoothing=smoothing, nll_coef=cpo_alpha)(
        hidden, weight, labels)
    ours = torch.autograd.grad(loss, (hidden, weight))

    # TRL shifts inside get_batch_logps: give it one extra position on each side.
    logits = hidden @ weight.t()
    padded_logits = torch.cat([logits, logits.new_zeros(2 * pairs, 1, VOCAB)], 1)
    padded_labels = torch.cat([torch.full((2 * pairs, 1), -100), labels], 1)
    harness = CPOHarness(beta=beta, gamma=gamma, label_smoothing=smoothing)
    avg = harness.get_batch_logps(padded_logits, padded_labels, average_log_prob=True)
    losses, chosen_rewards, rejected_rewards = harness.cpo_loss(avg[:pairs], avg[pairs:])
    # CPOTrainer.concatenated_forward's NLL (a local function there): mean cross-entropy of the chosen tokens.
    nll = torch.nn.CrossEntropyLoss()(padded_logits[:pairs, :-1].reshape(-1, VOCAB),
                                      padded_labels[:pairs, 1:].reshape(-1))
    trl_loss = losses.mean() + cpo_alpha * nll
    theirs = torch.autograd.grad(trl_loss, (hidden, weight))

    assert rel_err(loss, trl_loss) < LOSS_TOL
    for a, b in zip(ours, theirs):
        assert rel_err(a, b) < LOSS_TOL
    assert abs(metrics["rewards/chosen"].item() - chosen_rewards.mean().item()) < 1e-4
    assert abs(metrics["rewards/rejected"].item() - rejected_rewards.mean().item()) < 1e-4
    assert abs(metrics["nll_loss"].item() - nll.item()) < 1e-4


# ---------------------------------------------------------------------------------------- GRPO
class GRPOHarness:
    """The attributes ``GRPOTrainer._compute_loss`` reads, with TRL's methods bound as they are."""

    _compute_loss = GRPOTrainer._compute_loss
    _get_per_token_logps_and_entropies = GRPOTrainer._get_per_token_logps_and_entropies
    get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask

    def __init__(self, model, *, loss_type, beta, epsilon_low, epsilon_high, max_completion_length):
        self.model = model
        self.accelerator = accelerator()
        self.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
        self.loss_type, self.beta = loss_type, beta
        self.epsilon_low, self.epsilon_high = epsilon_low, epsilon_high
        self.max_completion_length = max_completion_length
        self.top_entropy_quantile, self.off_policy_mask_threshold = 1.0, None
        self.importance_sampling_level = "token"
        self.use_vllm, self.vllm_importance_sampling_correction = False, False
        self.current_gradient_accumulation_steps = 1
        self._entropy_bonus_enabled, self.aux_loss_enabled = False, False
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}


def grpo_batch(completions, prompt_len, completion_len):
    """Left-padded prompts, right-padded completions: GRPOTrainer's layout."""
    prompt_ids = torch.randint(1, VOCAB, (completions, prompt_len))
    prompt_mask = torch.ones_like(prompt_ids)
    completion_ids = torch.randint(1, VOCAB, (completions, completion_len))
    completion_mask = torch.zeros_like(completion_ids)
    for r in range(completions):
        pad = random.randint(0, prompt_len - 1)
        prompt_mask[r, :pad] = 0
        prompt_ids[r, :pad] = 0
        n = random.randint(1, completion_len)
        completion_mask[r, :n] = 1
        completion_ids[r, n:] = 0
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_matches_trl_grpo_trainer_with_hidden_state_gradients(loss_type):
    completions, prompt_len, completion_len = 6, 5, 9
    beta, eps_low, eps_high, temperature = 0.04, 0.2, 0.28, 0.8
    max_len = completion_len + 3
    policy = tiny_llama()
    reference = perturbed_copy(policy, 0.05)
    batch = grpo_batch(completions, prompt_len, completion_len)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    labels = batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    span = slice(prompt_len - 1, prompt_len - 1 + completion_len)  # position t predicts token t + 1
    with torch.no_grad():
        weight = policy.lm_head.weight
        ref_h = reference.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, span]
        ref_logps = ops.token_logprobs(ref_h, reference.lm_head.weight, labels, temperature=temperature)
        cur_h = policy.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, span]
        cur = ops.token_logprobs(cur_h, weight, labels, temperature=temperature)
    old_logps = (cur + 0.25 * torch.randn_like(cur)) * batch["completion_mask"]
    advantages = torch.randn(completions)
    num_items = int(batch["completion_mask"].sum()) + 17  # the global count spans other processes' tokens

    captured = {}

    def keep_hidden(_module, _args, output):
        output.last_hidden_state.retain_grad()
        captured["h"] = output.last_hidden_state

    # Ours
    hook = policy.model.register_forward_hook(keep_hidden)
    policy.model(input_ids=input_ids, attention_mask=attention_mask)
    hook.remove()
    loss, metrics = FusedLinearGRPOLoss(beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
                                        max_completion_length=max_len, temperature=temperature)(
        captured["h"][:, span], policy.lm_head.weight, labels, advantages=advantages,
        mask=batch["completion_mask"], old_logps=old_logps, ref_logps=ref_logps,
        num_items=num_items if loss_type == "dapo" else None)
    loss.backward()
    ours, ours_h = param_grads(policy), captured["h"].grad
    policy.zero_grad()

    # TRL
    add_fused_lm_head(policy, temperature=temperature, outputs=("log_probs", "entropy"))
    harness = GRPOHarness(policy, loss_type=loss_type, beta=beta, epsilon_low=eps_low, epsilon_high=eps_high,
                          max_completion_length=max_len)
    inputs = dict(batch, advantages=advantages, old_per_token_logps=old_logps, ref_per_token_logps=ref_logps,
                  num_items_in_batch=torch.tensor(float(num_items)))
    hook = policy.model.register_forward_hook(keep_hidden)
    trl_loss = harness._compute_loss(policy, inputs)
    hook.remove()
    trl_loss.backward()
    theirs, theirs_h = param_grads(policy), captured["h"].grad

    scale = max(abs(trl_loss.item()), 1e-2)  # positive and negative advantages cancel in the loss
    assert abs(loss.item() - trl_loss.item()) < LOSS_TOL * scale
    assert rel_err(ours_h, theirs_h) < GRAD_TOL
    assert abs(ours_h.norm().item() - theirs_h.norm().item()) < GRAD_TOL * theirs_h.norm().item()
    for name in theirs:
        assert rel_err(ours[name], theirs[name]) < GRAD_TOL, name
    logged = harness._metrics["train"]
    for ours_key, trl_key in (("kl", "kl"), ("entropy", "entropy"), ("clip_ratio/low_mean", "clip_ratio/low_mean"),
                              ("clip_ratio/high_mean", "clip_ratio/high_mean"),
                              ("clip_ratio/region_mean", "clip_ratio/region_mean")):
        want = logged[trl_key][-1]
        assert abs(metrics[ours_key].item() - want) <= 1e-4 * max(1.0, abs(want)), ours_key


def test_k3_kl_matches_trl_grpo_formula():
    logp = torch.randn(4, 9) - 2
    ref = logp + 0.5 * torch.randn(4, 9)
    # The expression of GRPOTrainer._compute_loss (inline there, so written out once here)
    trl_kl = torch.exp(ref - logp) - (ref - logp) - 1
    assert rel_err(ops.kl_penalty(logp, ref, kind="k3"), trl_kl) < 1e-6


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale_rewards):
    groups, size = 5, 4
    rewards = torch.randn(groups * size)
    rewards[:size] = 1.5  # a group whose rewards are all equal gets zero advantage
    # GRPOTrainer._generate_and_score_completions, the "sum_then_normalize" branch (inside a 400-line
    # method, so its lines are replicated; nanstd is TRL's own function)
    mean = torch.nanmean(rewards.view(-1, size), dim=1).repeat_interleave(size, dim=0)
    if scale_rewards in ("group", "none"):
        std = nanstd(rewards.view(-1, size), dim=1).repeat_interleave(size, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    want = rewards - mean
    if scale_rewards != "none":
        want = want / (std + 1e-4)
    got = ops.group_advantages(rewards, size, scale=scale_rewards)
    assert rel_err(got, want) < 1e-5
    assert got[:size].abs().max().item() == 0.0


def test_gae_matches_trl_ppo_loop():
    batch, length = 4, 11
    rewards = torch.randn(batch, length)
    values = torch.randn(batch, length)
    mask = torch.ones(batch, length)
    for r in range(batch):
        mask[r, random.randint(1, length):] = 0  # right padding
    gamma, lam = 0.97, 0.9
    # TRL's PPO trainer (trl <= 0.2x; PPO is no longer in trl 1.16): padding zeroed, then the reverse loop
    v, rw = values * mask, rewards * mask
    lastgaelam, reversed_adv = 0, []
    for t in reversed(range(length)):
        nextvalues = v[:, t + 1] if t < length - 1 else 0.0
        delta = rw[:, t] + gamma * nextvalues - v[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_adv.append(lastgaelam)
    want_adv = torch.stack(reversed_adv[::-1], 1)
    want_returns = want_adv + v
    adv, returns = ops.gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert rel_err(adv * mask, want_adv * mask) < 1e-5
    assert rel_err(returns * mask, want_returns * mask) < 1e-5
