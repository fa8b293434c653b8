"""Proximal Policy Optimization, classic RLHF: policy, reference, reward model and value model.

Each step samples one completion per prompt from the policy (a rollout), scores it with the reward
model, folds a per-token KL penalty against the reference into the rewards (``kl_estimator`` k1 or k3;
β fixed, or adapted after each rollout by Ziegler et al.'s controller when ``kl_target > 0``),
estimates advantages with ``ops.gae`` and whitens them with ``ops.whiten``, then trains ``ppo_epochs``
passes over the rollout in minibatches of ``mini_batch_size`` completions, one optimizer step each
(a minibatch runs in one forward, or in token-budget micro-batches with ``max_tokens_per_microbatch``;
``packed`` runs it padding-free):
the clipped policy loss (:class:`fastalign.losses.FusedLinearPPOLoss`, from hidden states and the LM
head, never the logits) plus ``vf_coef`` times the clipped value loss (``ops.value_loss``).

Supports: a separate value model initialised from the reward model (``value_model: separate``, the
usual choice) or a value head on the policy's trunk (``policy_trunk``: one model, two heads); the
reference as ``frozen_copy`` (optionally bf16 and/or on CPU between uses), ``adapter`` (LoRA policy,
no extra memory) or ``shared_trunk``; the reward model on CPU between uses (``reward_offload``); LoRA
policies; DDP or FSDP2 (``fsdp``: policy, separate value model and frozen_copy reference sharded; ``fsdp_offload``)
under torchrun (each process samples its share of the prompts). The memory each role
takes (parameters + buffers) is printed at start-up and stored in ``eval.json`` under ``memory_mib``.

Assumptions: one completion per prompt; the reward model scores prompt + completion at its last real
token, the format it was trained on (a completion cut at ``max_new_tokens`` is scored without its EOS);
the old log-probs come from one forward over prompt + completion after sampling (the same forward
gives the values; the reference's gives its log-probs), and the reference is read at temperature 1;
the lr schedule advances once per rollout; advantages are whitened per process, as TRL does; under FSDP2
the ``shared_trunk`` reference is refused and the reward model is not sharded.
Training runs through the engine's :class:`~fastalign.engine.trainer.Trainer`, one trainer step per
rollout: it resumes, stops on a NaN/Inf loss or gradient (naming the rollout and the update), logs, and
writes checkpoints (every ``save_every`` rollouts and at the end, atomically, under ``<run>/checkpoints``)
that hold what training changes — the policy and value weights, optimizer, schedule, KL coefficient,
prompt order and sampling RNG — so ``resume`` continues exactly where a crashed run stopped. The run's
final policy is saved as ``<run>/model`` (the value model only in the checkpoint). The final evaluation
goes to ``<run>/eval.json``, for the trained policy and (``start/...``) the policy it started
from, on held-out prompts: the task verifiers of greedy completions; the learned and the true (verifier)
reward of greedy completions (``eval_...``) and of completions sampled at ``temperature``
(``eval_sampled_...``, the expected reward PPO maximizes, which moves before the greedy answer flips);
and the KL to the start.

Run: ``fastalign ppo --config configs/ppo.yaml --reward_model runs/rm/model [--key value ...]``.
"""

from __future__ import annotations

import itertools
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from fastalign import ops
from fastalign.data import loading, tasks
from fastalign.engine import evaluation
from fastalign.engine.batching import process_microbatches
from fastalign.engine.config import PPOConfig
from fastalign.engine.distributed import full_model, gathered, no_sync, shard, shutdown, unwrap, wrap_model
from fastalign.engine.generation import decode, gathered_for_generation, generate, sample
from fastalign.engine.optim import build_optimizer, build_scheduler
from fastalign.engine.rollouts import (
    FILE_MAX_NEW_TOKENS,
    encode_prompts,
    global_means,
    max_new_tokens,
    verifier_means,
    verifier_rewards,
)
from fastalign.engine.runs import start_run, write_json
from fastalign.engine.trainer import BatchStream, Trainer
from fastalign.losses import FusedLinearPPOLoss
from fastalign.models.heads import (
    IGNORE_INDEX,
    CausalLMLogprobs,
    PolicyValueModel,
    ScalarHeadModel,
    TokenValueModel,
    lm_head,
    target_mask,
)
from fastalign.models.loading import load_from_config, load_tokenizer, module_bytes, save_pretrained
from fastalign.models.offload import OffloadedModel
from fastalign.models.packed import padding_removed
from fastalign.models.reference import build_reference


# --------------------------------------------------------------------------------------- KL control
class KLController:
    """β, the KL penalty's coefficient; ``update`` after each rollout. β is all a checkpoint keeps of it."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, saved: dict):
        self.value = float(saved["value"])


class FixedKLController(KLController):
    """β stays at its start value."""


class AdaptiveKLController(KLController):
    """Ziegler et al. (2019), as in TRL and OpenRLHF: after a rollout of ``n_steps`` completions whose mean
    KL to the reference was ``current_kl`` nats, ``β ← β · (1 + clip(current_kl / target − 1, ±0.2) ·
    n_steps / horizon)``: β grows while the policy is further than ``target`` from the reference."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        if target <= 0:
            raise ValueError(f"target must be > 0 nats, got {target!r}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1 completions, got {horizon!r}")
        super().__init__(kl_coef)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def kl_controller(cfg: PPOConfig) -> KLController:
    if cfg.kl_target > 0:
        return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


# ----------------------------------------------------------------------------- rewards, advantages
def token_rewards(scores, logps, ref_logps, mask, *, kl_coef, kl_estimator="k1"):
    """Per-token rewards ``[B, T]``: ``−kl_coef · KL_t`` on every completion token, plus the reward model's
    ``scores [B]`` on each row's last completion token. Returns ``(rewards, kl)``, both 0 off the mask."""
    m = mask.bool()
    if not bool(m.any(1).all()):
        raise ValueError("mask must select at least one completion token in every row")
    kl = torch.where(m, ops.kl_penalty(logps, ref_logps, kind=kl_estimator), torch.zeros_like(logps))
    rewards = -float(kl_coef) * kl
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, positions, torch.full_like(positions, -1)).amax(1)
    rewards[torch.arange(m.shape[0], device=m.device), last] += scores.float()
    return rewards, kl


def advantages_and_returns(rewards, values, mask, *, gamma, lam, whiten=True):
    """GAE over the completion tokens (``ops.gae``), the advantages then whitened over the batch's
    completion tokens (``ops.whiten``); returns ``(advantages, returns)`` with ``returns = GAE + values``."""
    advantages, returns = ops.gae(rewards, values, mask, gamma=gamma, lam=lam)
    if whiten:
        advantages = ops.whiten(advantages, mask)
    return advantages, returns


# ------------------------------------------------------------------------------------------ roles
def _reference_bytes(reference) -> int:
    held = getattr(reference, "model", None) or getattr(reference, "top", None)
    return module_bytes(held) if held is not None else int(reference.extra_bytes)


# ------------------------------------------------------------------------------------------ rollout
@dataclass
class ScoredRollout:
    """One sampled completion per prompt, scored by every role: what PPO trains on. Token tensors are ``[B, T-1]``,
    aligned with the policy's log-probs (position t scores ``input_ids[:, t+1]``; the value there is the state
    before it)."""

    batch: loading.Batch  # prompt + completion, right-padded [B, T]
    mask: torch.Tensor  # completion tokens
    logps: torch.Tensor  # the policy's log-probs at sampling time (PPO's old log-probs)
    ref_logps: torch.Tensor
    values: torch.Tensor  # 0 off the mask
    scores: torch.Tensor  # [B] the reward model's score of each completion
    verifier: list  # [B] the task verifier's reward (None for prompts that are not built-in tasks)
    completions: list  # [B] decoded completions
    rows: list  # [B] the prompt rows


def _policy_logps(policy_module, hidden, labels, temperature):
    head = gathered(policy_module, lm_head(policy_module.lm))  # the full head under FSDP2, read after the forward
    return ops.token_logprobs(hidden[:, :-1], head.weight, labels[:, 1:], bias=head.bias, temperature=temperature,
                              ignore_index=IGNORE_INDEX)


@torch.no_grad()
def sample_rollout(policy, critic, reference, reward_model, tokenizer, rows, cfg: PPOConfig, device,
                   generator=None) -> ScoredRollout:
    """Sample one completion per row from the policy, then score it with every role (one forward each)."""
    policy_module = unwrap(policy)
    new_tokens = max_new_tokens(cfg)
    prompt_ids = encode_prompts(tokenizer, rows, max_length=cfg.max_length, new_tokens=new_tokens)
    # The sampler's log-probs are not reused: the forward below gives the training forward's own old log-probs
    # (bit-consistent with the loss's) and the values and reference log-probs need that forward anyway.
    with gathered_for_generation(policy):
        completions = sample(policy_module.lm, tokenizer, prompt_ids, max_new_tokens=new_tokens,
                             temperature=cfg.temperature, batch_size=len(prompt_ids),
                             generator=generator).completions()
    # An empty completion has nothing to score or train on.
    keep = [i for i, c in enumerate(completions) if c]
    if not keep:
        raise ValueError("every completion of the rollout is empty (the policy sampled only padding)")
    rows, prompt_ids = [rows[i] for i in keep], [prompt_ids[i] for i in keep]
    completions = [completions[i] for i in keep]
    examples = [{"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c} for p, c in zip(prompt_ids, completions)]
    batch = loading.collate(examples, tokenizer.pad_token_id).to(device)
    mask = target_mask(batch.labels)

    was_training = policy_module.training
    policy_module.eval()
    hidden, values = policy_module(batch.input_ids, batch.attention_mask)
    logps = _policy_logps(policy_module, hidden, batch.labels, cfg.temperature)
    policy_module.train(was_training)
    # After the policy's forward: shared_trunk reuses the trunk activations it just computed.
    if reference.name == "adapter":  # through the policy's own forward, where an FSDP2 root gathers its weights
        with policy_module.lm.disable_adapter():
            ref_logps = _policy_logps(policy_module, policy_module(batch.input_ids, batch.attention_mask)[0],
                                      batch.labels, 1.0)
    else:
        ref_logps = reference.token_logps(batch)
    if critic is not None:
        critic_module = unwrap(critic)
        was_training = critic_module.training
        critic_module.eval()
        values = critic_module(batch.input_ids, batch.attention_mask)
        critic_module.train(was_training)
    values = torch.where(mask, values[:, :-1], torch.zeros_like(logps))
    scores = reward_model(batch.input_ids, batch.attention_mask).float()

    texts = decode(tokenizer, completions)
    return ScoredRollout(batch, mask, logps, ref_logps.float(), values, scores, verifier_rewards(rows, texts), texts,
                         rows)


# ----------------------------------------------------------------------------------------- training
def _rows_of(batch: loading.Batch, idx, width) -> loading.Batch:
    return loading.Batch(batch.input_ids[idx, :width], batch.attention_mask[idx, :width], batch.labels[idx, :width])


def minibatch_loss(policy, critic, policy_loss_fn, rollout: ScoredRollout, idx, advantages, returns, cfg: PPOConfig):
    """``policy loss + vf_coef · value loss`` on the rollout rows ``idx``; returns ``(loss, metrics)``."""
    width = int(rollout.batch.attention_mask[idx].sum(1).max())  # right padding: trailing pads change nothing
    batch, cut = _rows_of(rollout.batch, idx, width), slice(0, width - 1)
    mask = rollout.mask[idx, cut]
    hidden, values = policy(batch.input_ids, batch.attention_mask)
    head = gathered(policy, lm_head(unwrap(policy).lm))  # the full head under FSDP2, read after the forward
    pg_loss, pg = policy_loss_fn(hidden[:, :-1], head.weight, batch.labels[:, 1:], advantages=advantages[idx, cut],
                                 mask=mask, old_logps=rollout.logps[idx, cut], bias=head.bias)
    if critic is not None:
        values = critic(batch.input_ids, batch.attention_mask)
    vf_loss, vf = ops.value_loss(values[:, :-1], rollout.values[idx, cut], returns[idx, cut], mask,
                                 clip=cfg.cliprange_value)
    loss = pg_loss + cfg.vf_coef * vf_loss
    # The policy loss's metrics under their TRL names (clip_ratio/*, approx_kl, entropy), as GRPO logs them.
    metrics = {"loss": loss.detach(), "policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
               **{k: v for k, v in pg.items() if k != "kl"}, "value_clip_fraction": vf["clip_fraction"]}
    return loss, metrics


def minibatch_backward(policy, critic, policy_loss_fn, rollout: ScoredRollout, idx, advantages, returns,
                       cfg: PPOConfig, state) -> tuple[float, dict, int]:
    """Backward of :func:`minibatch_loss` on the rows ``idx``; returns ``(loss, metrics, forwards)``.

    With ``max_tokens_per_microbatch`` the rows run in token-budget micro-batches (:mod:`fastalign.engine.batching`).
    The policy and value losses are token means over the minibatch, so each micro-batch's loss and metrics weigh
    by its share of the minibatch's completion tokens: their sum is the minibatch's loss and gradient (``*_min`` and
    ``*_max`` metrics take the extreme over the micro-batches)."""
    if not cfg.max_tokens_per_microbatch:
        loss, metrics = minibatch_loss(policy, critic, policy_loss_fn, rollout, idx, advantages, returns, cfg)
        loss.backward()
        return float(loss.detach()), {k: float(v) for k, v in metrics.items()}, 1
    lengths = [[int(n)] for n in rollout.batch.attention_mask[idx].sum(1)]
    groups = process_microbatches(lengths, cfg.max_tokens_per_microbatch, packed=cfg.packed, state=state)
    total = rollout.mask[idx].sum()
    sums: dict = {}
    for j, group in enumerate(groups):
        rows = idx[torch.tensor(group, device=idx.device)]
        share = rollout.mask[rows].sum() / total
        last = j == len(groups) - 1
        with no_sync(policy, skip=not last), (no_sync(critic, skip=not last) if critic is not None else nullcontext()):
            loss, metrics = minibatch_loss(policy, critic, policy_loss_fn, rollout, rows, advantages, returns, cfg)
            (loss * share).backward()
        for k, v in metrics.items():
            if k.endswith(("_min", "_max")):  # the minibatch's extreme is the extreme over its micro-batches
                pick = min if k.endswith("_min") else max
                sums[k] = pick(sums.get(k, float(v)), float(v))
            else:
                sums[k] = sums.get(k, 0.0) + float(v) * float(share)
    return sums["loss"], sums, len(groups)


def rollout_metrics(rollout: ScoredRollout, kl, kl_coef, state) -> dict:
    """Learned reward, true (verifier) reward per task, KL per completion (global means over processes)."""
    n, seq_kl = len(rollout.rows), kl.sum(1)
    sums = {"score": rollout.scores.sum(), "kl": seq_kl.sum(), "non_score_reward": -kl_coef * seq_kl.sum(),
            "completion_length": rollout.mask.sum()}
    out = global_means(sums, dict.fromkeys(sums, n), state)
    out.update(verifier_means(rollout.rows, rollout.verifier, state))
    return out


# --------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def heldout_rewards(lm, reward_model, tokenizer, rows, cfg: PPOConfig, device, *, temperature=0.0,
                    generator=None) -> dict:
    """Mean learned reward and mean verifier reward (overall and per built-in task) of completions of held-out
    prompt rows: greedy when ``temperature == 0``, else sampled at ``temperature`` (``generator`` seeds it).

    Sampled completions are what PPO optimizes: their expected reward rises before the greedy answer flips.
    Keys: ``eval_learned_reward``, ``eval_verifier_reward`` and ``.../<task>``; when sampled ``eval_sampled_...``
    and the tasks' own rates of the samples (``eval_sampled_pronoun/neutral_rate``...).
    """
    scores, verifier, rates = {}, {}, {}
    by_task = itertools.groupby(sorted(rows, key=lambda r: str(r.get("task"))), key=lambda r: r.get("task"))
    for task, group in by_task:
        group = list(group)
        new = tasks.get_task(task).max_new_tokens if task in tasks.TASKS else (cfg.max_new_tokens or
                                                                               FILE_MAX_NEW_TOKENS)
        prompt_ids = [loading.encode_prompt(tokenizer, r["prompt"]) for r in group]
        if temperature > 0:
            completions = sample(lm, tokenizer, prompt_ids, max_new_tokens=new, temperature=temperature,
                                 batch_size=cfg.eval_batch_size, generator=generator).completions()
        else:
            completions = generate(lm, tokenizer, prompt_ids, max_new_tokens=new, batch_size=cfg.eval_batch_size)
        task_scores = []
        for start in range(0, len(group), cfg.eval_batch_size):
            part = slice(start, start + cfg.eval_batch_size)
            examples = [{"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c}
                        for p, c in zip(prompt_ids[part], completions[part])]
            batch = loading.collate(examples, tokenizer.pad_token_id).to(device)
            task_scores += reward_model(batch.input_ids, batch.attention_mask).float().tolist()
        scores[task] = task_scores
        if task in tasks.TASKS:
            texts = decode(tokenizer, completions)
            verifier[task] = [tasks.get_task(task).reward(r, t) for r, t in zip(group, texts)]
            if temperature > 0:  # the greedy verifier metrics come from evaluation.task_metrics
                rates.update({f"{task}/{k}": v for k, v in tasks.get_task(task).score(group, texts).items()})
    prefix = "eval_sampled_" if temperature > 0 else "eval_"
    mean = lambda lists: sum(sum(x) for x in lists) / sum(len(x) for x in lists)
    out = {f"{prefix}learned_reward": mean(scores.values())}
    out.update({f"{prefix}learned_reward/{t}": mean([v]) for t, v in scores.items() if t in tasks.TASKS})
    if verifier:
        out[f"{prefix}verifier_reward"] = mean(verifier.values())
        out.update({f"{prefix}verifier_reward/{t}": mean([v]) for t, v in verifier.items()})
    out.update({f"{prefix}{k}": v for k, v in rates.items()})
    return out


def evaluate_policy(lm, reward_model, tokenizer, rows, cfg: PPOConfig, device) -> dict:
    """Held-out rewards of greedy and of sampled (``cfg.temperature``) completions; the sampling seed is fixed
    by ``cfg.seed``, so the start and the trained policy are measured on the same random stream."""
    out = heldout_rewards(lm, reward_model, tokenizer, rows, cfg, device)
    generator = torch.Generator().manual_seed(cfg.seed + 7919)
    out.update(heldout_rewards(lm, reward_model, tokenizer, rows, cfg, device, temperature=cfg.temperature,
                               generator=generator))
    return out


# --------------------------------------------------------------------------------------------- flow
def run(cfg: PPOConfig) -> dict:
    # --- config, run folder -------------------------------------------------------------------
    state, run_dir = start_run(cfg, "ppo")
    start = cfg.init_from or cfg.model
    per_rank = cfg.batch_size // state.world_size
    if cfg.batch_size % state.world_size or per_rank % cfg.mini_batch_size:
        raise ValueError(f"mini_batch_size must divide batch_size / world size = {cfg.batch_size} / "
                         f"{state.world_size}, got {cfg.mini_batch_size}")

    # --- roles: policy (+ value head), reference, reward model, value model ----------------------
    tokenizer = load_tokenizer(cfg.tokenizer or start)
    lm = load_from_config(cfg, start, device=state.device)
    policy = PolicyValueModel(lm, value_head=cfg.value_model == "policy_trunk", packed=cfg.packed).to(state.device)
    # Before wrapping: shared_trunk decides which layers train.
    reference = build_reference(cfg.reference, CausalLMLogprobs(lm), cfg)
    reward_model = OffloadedModel(ScalarHeadModel.load(cfg.reward_model, dtype=cfg.dtype), state.device,
                                  cfg.reward_offload)
    critic = None
    if cfg.value_model == "separate":
        critic = TokenValueModel(ScalarHeadModel.load(cfg.reward_model, dtype=cfg.dtype),
                                 packed=cfg.packed).to(state.device)
    memory = {"policy": module_bytes(lm) / 2**20,
              "value_model": module_bytes(critic if critic is not None else policy.value_head) / 2**20,
              "reference": _reference_bytes(reference) / 2**20,
              "reward_model": module_bytes(reward_model.module) / 2**20}
    if state.is_main:
        where = lambda off: "CPU between uses" if off else f"on {state.device}"
        print("memory by role (parameters + buffers): "
              f"policy {memory['policy']:.2f} MiB {where(False)}; "
              f"value model {memory['value_model']:.2f} MiB "
              f"({'separate, from the reward model' if critic is not None else 'head on the policy trunk'}); "
              f"reference {memory['reference']:.2f} MiB ({reference.name}, "
              f"{where(getattr(reference, 'offload', False))}); "
              f"reward model {memory['reward_model']:.2f} MiB ({where(reward_model.offload)})")
    if cfg.fsdp and state.distributed and getattr(reference, "model", None) is not None:
        shard(reference.model, frozen=True, offload=cfg.fsdp_offload)  # frozen_copy: resharded after each forward
    policy = wrap_model(policy, state, fsdp=cfg.fsdp, offload=cfg.fsdp_offload)
    critic = wrap_model(critic, state, fsdp=cfg.fsdp, offload=cfg.fsdp_offload) if critic is not None else None

    # --- data: prompt rows, each process its share of every rollout --------------------------------
    rows = loading.load_rows(cfg.dataset, "prompts", n=cfg.num_examples, seed=cfg.seed)
    prompts = BatchStream(rows, lambda examples, index: examples, batch_size=cfg.batch_size, state=state,
                          seed=cfg.seed)

    # --- loss, optimizer, KL controller, trainer ---------------------------------------------------------
    policy_loss_fn = FusedLinearPPOLoss(epsilon_low=cfg.cliprange, temperature=cfg.temperature,
                                        entropy_coef=cfg.entropy_coef)
    params = list(unwrap(policy).parameters()) + (list(unwrap(critic).parameters()) if critic is not None else [])
    optimizer = build_optimizer(params, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    controller = kl_controller(cfg)
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state.rank)  # sampling and minibatch order
    # What training changes, for checkpoints: the policy (with its value head) and the separate value model; β and
    # the sampling RNG travel with them, so a resumed run continues exactly.
    trained_roles = torch.nn.ModuleDict({"policy": unwrap(policy), **({"critic": unwrap(critic)} if critic else {})})
    trainer = Trainer(cfg=cfg, run_dir=run_dir, model=trained_roles, optimizer=optimizer, scheduler=scheduler,
                      stream=prompts, state=state, desc="ppo", history_keys=("loss", "score", "kl"),
                      extra_state={"kl_controller": controller, "generator": generator})

    # --- one step: rollout → rewards and advantages → PPO epochs over minibatches ------------------------
    def ppo_step(step):
        t0 = time.time()
        rollout = sample_rollout(policy, critic, reference, reward_model, tokenizer, prompts.next()[0], cfg,
                                 state.device, generator)
        kl_coef = controller.value
        rewards, kl = token_rewards(rollout.scores, rollout.logps, rollout.ref_logps, rollout.mask, kl_coef=kl_coef,
                                    kl_estimator=cfg.kl_estimator)
        advantages, returns = advantages_and_returns(rewards, rollout.values, rollout.mask, gamma=cfg.gamma,
                                                     lam=cfg.lam, whiten=cfg.whiten_advantages)
        t1 = time.time()
        sums, updates, tokens = {}, 0, 0
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(len(rollout.rows), generator=generator).to(state.device)
            for idx in order.split(cfg.mini_batch_size):
                loss, metrics, forwards = minibatch_backward(policy, critic, policy_loss_fn, rollout, idx,
                                                             advantages, returns, cfg, state)
                metrics["forwards"] = forwards * state.world_size  # logged as a mean over processes: the total
                metrics["grad_norm"] = trainer.optimizer_step(loss, f" (PPO epoch {epoch + 1}, update {updates + 1})")
                if cfg.packed:
                    metrics["padding_removed"] = padding_removed(rollout.batch.attention_mask[idx],
                                                                 cfg.attn_implementation)
                updates += 1
                tokens += int(rollout.batch.attention_mask[idx].sum())
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        out = rollout_metrics(rollout, kl, kl_coef, state)
        out.update(global_means(sums, dict.fromkeys(sums, updates), state))
        controller.update(out["kl"], n_steps=cfg.batch_size)
        out.update(kl_coef=kl_coef, rollout_s=t1 - t0, train_s=time.time() - t1)
        return out, tokens

    history = trainer.fit(ppo_step).history

    # --- evaluation on held-out prompts --------------------------------------------------------------
    report = {"flow": "ppo", "run_dir": str(run_dir), "steps": cfg.max_steps, "value_model": cfg.value_model,
              "reference": cfg.reference, "memory_mib": memory, "final_kl_coef": controller.value,
              "first_rollout": {k: history[0][k] for k in ("score", "kl") if k in history[0]},
              "last_rollout": {k: history[-1][k] for k in ("score", "kl") if k in history[-1]}}
    # An FSDP-sharded policy is gathered whole onto the main process first (a collective).
    trained = full_model(policy, state, lambda: PolicyValueModel(load_from_config(cfg, start),
                                                                 value_head=cfg.value_model == "policy_trunk"))
    if state.is_main:
        trained = trained.lm
        metrics, start_lm, prompts = evaluation.online_policy_report(cfg, trained, tokenizer, start, state.device)
        report.update(metrics)
        if prompts is not None:
            report.update(evaluate_policy(trained, reward_model, tokenizer, prompts, cfg, state.device))
            report.update({f"start/{k}": v for k, v in
                           evaluate_policy(start_lm, reward_model, tokenizer, prompts, cfg, state.device).items()})

        # --- report: the trained policy and the numbers ------------------------------------------------
        save_pretrained(trained, tokenizer, run_dir / "model")
        write_json(run_dir / "eval.json", report)
        print(f"ppo: {report}")
    shutdown(state)
    return report
