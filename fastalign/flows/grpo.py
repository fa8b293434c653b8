"""Group Relative Policy Optimization: G sampled completions per prompt, rewards relative to the group.

Each rollout samples ``num_generations`` completions for each of ``batch_size`` prompts
(:func:`fastalign.engine.generation.sample`: KV cache, temperature/top-p/top-k, EOS and stop strings),
scores them with the reward sources of :mod:`fastalign.rewards` (built-in verifiers, a trained reward
model, ``module:function``; weighted), turns the rewards into advantages (``ops.group_advantages`` with
``group``/``batch``/``none`` scaling, or ``ops.rloo_advantages``) and trains ``num_iterations`` optimizer
steps on it with :class:`fastalign.losses.FusedLinearGRPOLoss` (clipped ratio with ε_low/ε_high, loss
types grpo/bnpo/dr_grpo/dapo, ``beta`` × k3 KL to the reference), from hidden states and the LM head:
the ``tokens × vocabulary`` logits are never built.

Supports: ``beta = 0`` loads no reference model at all; ``beta > 0`` holds the reference as
``frozen_copy`` (optionally bf16 / CPU-offloaded), ``adapter`` (LoRA policy) or ``shared_trunk``; the
reference log-probs are read once per rollout. ``num_iterations > 1`` uses the sampling log-probs stored
with the rollout as the old log-probs (recomputed by the policy when vLLM sampled). DDP under torchrun
(each process samples whole groups for its share of the prompts; the ``batch`` std and dapo's token
count are global); gradient accumulation (``micro_batch_size``); checkpoints and exact resume through
the engine trainer (the pending rollout and the sampling RNG are part of the checkpoint).

Assumptions: ``max_steps`` counts optimizer steps (``ceil(max_steps / num_iterations)`` rollouts);
``bnpo`` is the token mean of each micro-batch averaged over micro-batches and processes (TRL's
local-batch meaning), the other loss types are world-size invariant; with ``num_iterations = 1`` the
old log-probs are the current ones (ratio 1, as TRL); the reward model scores prompt + completion
tokens; no FSDP (the fused loss reads the LM head outside the forward). The final evaluation (task
verifiers on held-out prompts for the start and the trained policy, the KL to the start) goes to
``<run>/eval.json``.

Run: ``fastalign grpo --config configs/grpo.yaml --init_from runs/sft/model [--key value ...]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

from fastalign import ops
from fastalign.data import loading, tasks
from fastalign.engine import evaluation
from fastalign.engine.config import GRPOConfig
from fastalign.engine.distributed import DistState, all_reduce_sum, shutdown, unwrap, wrap_model
from fastalign.engine.generation import Rollout, decode, gathered_for_generation, make_sampler
from fastalign.engine.optim import build_optimizer, build_scheduler
from fastalign.engine.runs import start_run, write_json
from fastalign.engine.trainer import train
from fastalign.losses import FusedLinearGRPOLoss
from fastalign.models.heads import IGNORE_INDEX, CausalLMLogprobs, PolicyValueModel, completion_aligned, lm_head
from fastalign.models.loading import (
    load_from_config,
    load_tokenizer,
    parameter_bytes,
    resolve_model_path,
    save_pretrained,
)
from fastalign.models.reference import build_reference
from fastalign.rewards import build_rewards

FILE_MAX_NEW_TOKENS = 16  # completion length for prompts that are not built-in tasks (when max_new_tokens = 0)


def max_new_tokens(cfg: GRPOConfig) -> int:
    if cfg.max_new_tokens:
        return cfg.max_new_tokens
    names = tasks.parse_task_spec(cfg.dataset)
    return max(tasks.get_task(n).max_new_tokens for n in names) if names else FILE_MAX_NEW_TOKENS


# ------------------------------------------------------------------------------------- advantages
def compute_advantages(rewards, group_size, kind, state: DistState | None = None):
    """Advantages ``[N]`` of this process's rewards ``[N]`` (whole groups of ``group_size``, contiguous).
    ``batch`` scaling needs the std of the global batch: the rewards are all-gathered first."""
    if kind == "rloo":
        return ops.rloo_advantages(rewards, group_size)
    if kind == "batch" and state is not None and state.distributed:
        everyone = [torch.empty_like(rewards) for _ in range(state.world_size)]
        dist.all_gather(everyone, rewards)
        full = ops.group_advantages(torch.cat(everyone), group_size, scale="batch")
        return full[state.rank * rewards.numel():(state.rank + 1) * rewards.numel()]
    return ops.group_advantages(rewards, group_size, scale=kind)


# ---------------------------------------------------------------------------------- training batch
@dataclass
class GRPOBatch:
    """Rows of a rollout, right-padded ``[n, W]``; per-token tensors are ``[n, W-1]`` aligned with the shifted
    labels (position t scores ``input_ids[:, t+1]``), 0 off the completion tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    advantages: torch.Tensor  # [n]
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None

    def to(self, device):
        move = lambda t: None if t is None else t.to(device)
        return GRPOBatch(*(move(getattr(self, f)) for f in ("input_ids", "attention_mask", "labels", "advantages",
                                                            "old_logps", "ref_logps")))

    def rows(self, idx) -> GRPOBatch:
        width = int(self.attention_mask[idx].sum(1).max())  # right padding: trailing pads change nothing
        cut = lambda t, w: None if t is None else t[idx, :w]
        return GRPOBatch(self.input_ids[idx, :width], self.attention_mask[idx, :width], self.labels[idx, :width],
                         self.advantages[idx], cut(self.old_logps, width - 1), cut(self.ref_logps, width - 1))

    def num_completion_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def token_aligned(rollout: Rollout, values, labels):
    """Per-completion-token ``values [N, T]`` (masked by the rollout) placed at the shifted label positions."""
    out = torch.zeros(labels.shape[0], labels.shape[1] - 1, dtype=torch.float32)
    out[labels[:, 1:] != IGNORE_INDEX] = values[rollout.completion_mask.bool()].float()
    return out


def _hidden_logps(model_lm, batch, temperature, hidden_fn):
    head = lm_head(model_lm)
    hidden = hidden_fn(batch.input_ids, batch.attention_mask)
    logp = ops.token_logprobs(hidden[:, :-1], head.weight, batch.labels[:, 1:], bias=head.bias,
                              temperature=temperature, ignore_index=IGNORE_INDEX)
    return torch.where(batch.labels[:, 1:] != IGNORE_INDEX, logp, torch.zeros_like(logp))


@torch.no_grad()
def reference_logps(reference, policy_lm, batch, temperature):
    """The reference's per-token log-probs ``[n, W-1]`` at the sampling temperature (no gradient)."""
    if temperature == 1.0 or reference.name == "shared_trunk":
        if reference.name == "shared_trunk":
            reference.captured = None  # activations captured while generating are not this batch's
        return reference.token_logps(loading.Batch(batch.input_ids, batch.attention_mask, batch.labels)).float()
    if reference.name == "adapter":
        with policy_lm.disable_adapter():
            return _hidden_logps(policy_lm, batch, temperature, CausalLMLogprobs(policy_lm).hidden_states)
    model = reference.model
    if reference.offload:
        model.to(batch.input_ids.device)
    out = _hidden_logps(model.lm, batch, temperature, model.hidden_states)
    if reference.offload:
        model.to("cpu")
    return out


@torch.no_grad()
def policy_logps(policy_module: PolicyValueModel, batch, temperature):
    """The policy's current per-token log-probs ``[n, W-1]`` (no gradient), as the loss computes them."""
    was_training = policy_module.training
    policy_module.eval()
    out = _hidden_logps(policy_module.lm, batch, temperature, lambda i, m: policy_module(i, m)[0])
    policy_module.train(was_training)
    return out


def reference_parameters(reference) -> int:
    """Parameters the reference holds beyond the policy (0 for none and for ``adapter``)."""
    held = None if reference is None else (getattr(reference, "model", None) or getattr(reference, "top", None))
    return 0 if held is None else sum(p.numel() for p in held.parameters())


# ----------------------------------------------------------------------------------------- loss
def grpo_loss_fn(loss_module: FusedLinearGRPOLoss, cfg: GRPOConfig):
    """``loss_fn(model, batch) -> (loss_sum, metric_sums)`` and ``weight_fn(batch)`` for the engine trainer,
    which divides by the global sum of ``weight_fn``: tokens for dapo, sequences for grpo and dr_grpo, and
    micro-batches for bnpo (each micro-batch's token mean counts once)."""
    loss_type = cfg.loss_type
    # Gradient checkpointing recomputes layers without a KV cache, so the shared-prompt forward is off there.
    share_prompts = cfg.share_prompt_forward and not cfg.gradient_checkpointing

    def loss_fn(model, batch: GRPOBatch):
        labels, old, ref = batch.labels[:, 1:], batch.old_logps, batch.ref_logps
        if share_prompts:
            plen = prompt_lengths(batch)
            hidden, _ = model(batch.input_ids, batch.attention_mask, prompt_lengths=plen)
            labels, old, ref = completion_aligned(plen, hidden.shape[1], labels, old, ref)
        else:
            hidden, _ = model(batch.input_ids, batch.attention_mask)
            hidden = hidden[:, :-1]
        head = lm_head(unwrap(model).lm)
        loss, metrics = loss_module(hidden, head.weight, labels, advantages=batch.advantages, old_logps=old,
                                    ref_logps=ref, bias=head.bias, num_items=1 if loss_type == "dapo" else None)
        n = weight_fn(batch)
        # grpo/dr_grpo divide by the local row count: × rows makes the sum over rows; dapo (num_items 1) is a sum.
        scale = batch.input_ids.shape[0] if loss_type in ("grpo", "dr_grpo") else 1
        return loss * scale, {k: v.detach() * n for k, v in metrics.items()}

    def weight_fn(batch: GRPOBatch):
        if loss_type == "dapo":
            return batch.num_completion_tokens()
        return batch.input_ids.shape[0] if loss_type in ("grpo", "dr_grpo") else 1

    return loss_fn, weight_fn


def prompt_lengths(batch: GRPOBatch) -> torch.Tensor:
    """Each row's prompt length: the column of its first completion label (its whole length if it has none)."""
    has = batch.labels != IGNORE_INDEX
    return torch.where(has.any(1), has.int().argmax(1), batch.attention_mask.sum(1))


# ------------------------------------------------------------------------------------ rollout stream
@dataclass
class RolloutStream:
    """What the engine trainer pulls each step: the micro-batches of the current rollout, a new rollout every
    ``num_iterations`` steps. Its ``state_dict`` (prompt position, sampling RNG, pending rollout) makes resume
    exact."""

    cfg: GRPOConfig
    state: DistState
    rows: list
    sample_fn: object  # rows -> (GRPOBatch, metrics)
    generator: torch.Generator = field(default_factory=torch.Generator)
    position: int = 0
    epoch: int = 0
    pending: GRPOBatch | None = None
    uses_left: int = 0
    metrics: dict = field(default_factory=dict)

    def _prompt_rows(self):
        per_rank = self.cfg.batch_size // self.state.world_size
        if self.position + self.cfg.batch_size > len(self.rows):
            self.epoch, self.position = self.epoch + 1, 0
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.rows), generator=g).tolist()
        batch = order[self.position:self.position + self.cfg.batch_size]
        self.position += self.cfg.batch_size
        return [self.rows[i] for i in batch[self.state.rank * per_rank:(self.state.rank + 1) * per_rank]]

    def next(self):
        if self.pending is None or self.uses_left == 0:
            t0 = time.time()
            self.pending, self.metrics = self.sample_fn(self._prompt_rows(), self.generator)
            self.metrics["rollout_s"] = time.time() - t0
            self.uses_left = self.cfg.num_iterations
        self.uses_left -= 1
        n = self.pending.input_ids.shape[0]
        micro = self.cfg.micro_batch_size or n
        return [self.pending.rows(torch.arange(s, min(s + micro, n))) for s in range(0, n, micro)]

    def state_dict(self):
        # The pending rollout as a dict of tensors: checkpoints hold plain data only (no pickled classes).
        pending = self.pending and {f.name: getattr(self.pending, f.name) for f in fields(self.pending)}
        return {"position": self.position, "epoch": self.epoch, "generator": self.generator.get_state(),
                "pending": pending, "uses_left": self.uses_left, "metrics": self.metrics}

    def load_state_dict(self, s):
        self.position, self.epoch = s["position"], s["epoch"]
        pending = s["pending"]
        self.pending = GRPOBatch(**pending) if isinstance(pending, dict) else pending
        self.uses_left, self.metrics = s["uses_left"], s["metrics"]
        self.generator.set_state(s["generator"])


def _global_mean(value: float, count: float, state: DistState) -> float:
    totals = all_reduce_sum(torch.tensor([value * count, count], dtype=torch.float64), state)
    return float(totals[0] / totals[1].clamp(min=1))


def make_rollout(policy, sampler, rewards, reference, tokenizer, cfg: GRPOConfig, state: DistState):
    """``sample(rows, generator) -> (GRPOBatch, metrics)``: sample, score, advantages, stored log-probs."""
    new_tokens = max_new_tokens(cfg)
    recompute_old = cfg.num_iterations > 1 and not hasattr(sampler, "model")  # vLLM log-probs are the engine's

    def sample(rows, generator):
        policy_module = unwrap(policy)
        prompt_ids = [loading.encode_prompt(tokenizer, r["prompt"])[-max(cfg.max_length - new_tokens, 1):]
                      for r in rows]
        with gathered_for_generation(policy):
            rollout = sampler.sample(prompt_ids, max_new_tokens=new_tokens, temperature=cfg.temperature,
                                     top_p=cfg.top_p, top_k=cfg.top_k, stop_strings=cfg.stop_strings,
                                     num_samples=cfg.num_generations, batch_size=len(prompt_ids) * cfg.num_generations,
                                     generator=generator)
        completion_ids = rollout.completions()
        texts = decode(tokenizer, completion_ids)
        sample_rows = [rows[i] for i in rollout.prompt_index.tolist()]
        total, parts = rewards.score(sample_rows, texts, completion_ids)
        advantages = compute_advantages(total, cfg.num_generations, cfg.advantage, state)

        ids, attn, labels = rollout.training_batch(tokenizer.pad_token_id)
        batch = GRPOBatch(ids, attn, labels, advantages).to(state.device)
        if cfg.num_iterations > 1:
            batch.old_logps = (policy_logps(policy_module, batch, cfg.temperature) if recompute_old else
                               token_aligned(rollout, rollout.logprobs, labels).to(state.device))
        if reference is not None:
            batch.ref_logps = reference_logps(reference, policy_module.lm, batch, cfg.temperature)

        lengths = rollout.completion_mask.sum(1).float()
        metrics = {"reward": _global_mean(float(total.mean()), len(total), state),
                   "reward_std": _global_mean(float(total.view(-1, cfg.num_generations).std(1).mean()),
                                              len(total), state),
                   "completion_length": _global_mean(float(lengths.mean()), len(total), state)}
        if len(parts) > 1:
            metrics.update({f"reward/{k}": _global_mean(float(v.mean()), len(v), state) for k, v in parts.items()})
        for name in sorted(tasks.TASKS):
            hits = [tasks.get_task(name).reward(r, t) for r, t in zip(sample_rows, texts) if r.get("task") == name]
            if all_reduce_sum(float(len(hits)), state):
                metrics[f"{name}/verifier_reward"] = _global_mean(sum(hits) / max(len(hits), 1), len(hits), state)
        return batch, metrics

    return sample


# --------------------------------------------------------------------------------------------- flow
def run(cfg: GRPOConfig) -> dict:
    # --- config, run folder -------------------------------------------------------------------
    state, run_dir = start_run(cfg, "grpo")
    start = cfg.init_from or cfg.model
    if cfg.batch_size % state.world_size:
        raise ValueError(f"batch_size must be divisible by the world size {state.world_size}, got {cfg.batch_size}")
    per_rank = cfg.batch_size // state.world_size * cfg.num_generations
    if cfg.micro_batch_size and per_rank % cfg.micro_batch_size:
        raise ValueError(f"micro_batch_size must divide a process's completions per rollout ({per_rank}), "
                         f"got {cfg.micro_batch_size}")

    # --- models: policy, reference (only when beta > 0), reward sources -----------------------------
    tokenizer = load_tokenizer(cfg.tokenizer or start)
    lm = load_from_config(cfg, start, device=state.device)
    # Before wrapping: shared_trunk decides which layers train. beta = 0: no reference model exists at all.
    reference = build_reference(cfg.reference, CausalLMLogprobs(lm), cfg) if cfg.beta > 0 else None
    policy = wrap_model(PolicyValueModel(lm), state)
    rewards = build_rewards(cfg.rewards, cfg.reward_weights, tokenizer=tokenizer, device=state.device,
                            dtype=cfg.dtype)
    sampler = make_sampler(cfg.generation_backend, lm, tokenizer, model_path=resolve_model_path(start))
    parameters = {"policy": sum(p.numel() for p in lm.parameters()), "reference": reference_parameters(reference)}
    if state.is_main:
        ref_text = "none (beta = 0)" if reference is None else \
            f"{reference.name}, +{reference.extra_bytes / 2**20:.2f} MiB"
        print(f"grpo: policy {parameter_bytes(lm) / 2**20:.2f} MiB; reference: {ref_text}; "
              f"rewards: {', '.join(s.name for s in rewards.sources)}")

    # --- data: prompt rows ----------------------------------------------------------------------------
    rows = loading.load_rows(cfg.dataset, "prompts", n=cfg.num_examples, seed=cfg.seed)
    if len(rows) < cfg.batch_size:
        raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the dataset ({len(rows)} prompt rows)")
    stream = RolloutStream(cfg, state, rows, make_rollout(policy, sampler, rewards, reference, tokenizer, cfg, state))
    stream.generator.manual_seed(cfg.seed * 1_000_003 + 7919 * state.rank)

    # --- loss and loop --------------------------------------------------------------------------
    loss_module = FusedLinearGRPOLoss(beta=cfg.beta, loss_type=cfg.loss_type, epsilon_low=cfg.epsilon,
                                      epsilon_high=cfg.epsilon_high or None, temperature=cfg.temperature,
                                      max_completion_length=max_new_tokens(cfg))
    loss_fn, weight_fn = grpo_loss_fn(loss_module, cfg)
    optimizer = build_optimizer(unwrap(policy).parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg)

    def on_step(step):
        sampler.load_weights(lm.state_dict())  # HF: nothing to do (it samples from the policy); vLLM: weight sync
        return dict(stream.metrics)

    result = train(cfg=cfg, run_dir=run_dir, model=policy, optimizer=optimizer, scheduler=scheduler, stream=stream,
                   loss_fn=loss_fn, weight_fn=weight_fn, state=state, desc="grpo", on_step=on_step)

    # --- evaluation on held-out prompts ------------------------------------------------------------
    report = {"flow": "grpo", "run_dir": str(run_dir), "steps": result.step, "loss_type": cfg.loss_type,
              "advantage": cfg.advantage, "beta": cfg.beta, "parameters": parameters,
              "reference": None if reference is None else reference.name}
    if state.is_main:
        trained = unwrap(policy).lm
        report.update(evaluation.online_policy_report(cfg, trained, tokenizer, start, state.device)[0])

        # --- report: the trained policy and the numbers ------------------------------------------------
        save_pretrained(trained, tokenizer, run_dir / "model")
        write_json(run_dir / "eval.json", report)
        print(f"grpo: {report}")
    shutdown(state)
    return report
