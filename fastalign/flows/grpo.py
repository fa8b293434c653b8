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
count are global); FSDP2 (``fsdp``: the policy and the frozen_copy reference sharded, the reference
resharded after each forward, ``fsdp_offload`` for CPU offload; generation gathers the policy once per
rollout and the loss reads the gathered LM head); gradient accumulation (``micro_batch_size`` or
``max_tokens_per_microbatch``); the padding-free packed forward (``packed``, in place of the shared-prompt
forward); checkpoints and exact resume through the engine trainer (the pending rollout and the sampling RNG
are part of the checkpoint; the weights and optimizer state load at any world size).

This year's objectives (TRL 1.16's names): ``importance_sampling_level`` (GSPO, GSPO-token), ``loss_type:
cispo``, ``delta``, ``ratio_clip_c``, ``use_bias_correction_kl`` (on by default, as TRL, when ``beta > 0``),
``top_entropy_quantile`` and ``entropy_coef`` go to the fused loss; ``rollout_is_correction`` and
``off_policy_mask_threshold`` become per-token loss weights at rollout time (sampler vs. recomputed policy
log-probs); ``advantage: reinforce_pp | reinforce_pp_baseline``; DAPO's ``dynamic_sampling`` (at most
``max_sampling_rounds``) and ``overlong_buffer``/``overlong_penalty``. Recipes: ``configs/grpo_{gspo,dapo,cispo}.yaml``.
``top_entropy_quantile < 1`` needs every token's entropy before any gradient, which costs the loss a no-grad
pre-pass (one more logits GEMM a token); when the rollout already runs the policy's no-grad forward (rollout
correction or off-policy mask on) and ``num_iterations = 1`` (later iterations
train a changed policy: TRL takes the mask at each forward), that forward also returns the entropies, stored
with the rollout (``GRPOBatch.entropies``), and the loss takes the mask from them in its one pass (the same
weights and temperature as the loss's forward, in eval mode like the old log-probs; only float rounding
between the two forwards can move a token sitting exactly at the quantile).

Assumptions: ``max_steps`` counts optimizer steps (``ceil(max_steps / num_iterations)`` rollouts);
``bnpo`` is the token mean of each micro-batch averaged over micro-batches and processes (TRL's
local-batch meaning), the other loss types are world-size invariant; with ``num_iterations = 1`` the
old log-probs are the current ones (ratio 1, as TRL); the reward model scores prompt + completion
tokens; under FSDP2 the ``shared_trunk`` reference is refused (it reads the sharded trunk outside its
forward). The final evaluation (task verifiers on held-out prompts for the start and the trained policy,
the KL to the start) goes to
``<run>/eval.json``.

Run: ``fastalign grpo --config configs/grpo.yaml --init_from runs/sft/model [--key value ...]``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from fastalign import ops
from fastalign.data import loading
from fastalign.engine import evaluation
from fastalign.engine.batching import process_microbatches
from fastalign.engine.config import GRPOConfig
from fastalign.engine.distributed import (
    DistState,
    all_reduce_sum,
    full_model,
    full_state_dict,
    gathered,
    shard,
    shutdown,
    unwrap,
    wrap_model,
)
from fastalign.engine.generation import HFSampler, SampledCompletions, decode, gathered_for_generation, make_sampler
from fastalign.engine.optim import build_optimizer, build_scheduler
from fastalign.engine.rollouts import encode_prompts, global_means, max_new_tokens, verifier_means, verifier_rewards
from fastalign.engine.runs import start_run, write_json
from fastalign.engine.trainer import BatchStream, train
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


# ------------------------------------------------------------------ this year's objectives (issue 12)
def overlong_penalty(lengths, max_tokens: int, buffer: int, penalty: float):
    """DAPO's soft overlong punishment of completions of ``lengths``: 0 up to ``max_tokens − buffer``, then
    ``penalty · ((max_tokens − buffer) − |y|) / buffer`` down to ``−penalty`` at ``max_tokens`` and beyond."""
    start = max_tokens - buffer
    over = (start - lengths.float()) / buffer
    return penalty * torch.where(lengths <= start, torch.zeros_like(over), over.clamp(min=-1.0))


def zero_variance_groups(rewards, group_size: int):
    """``[groups]`` bool: the groups whose rewards are all equal (no advantage, no policy gradient)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(1)


def reinforce_pp_token_advantages(rewards, batch, kind: str, group_size: int):
    """REINFORCE++ (``reinforce_pp``) or REINFORCE++-baseline advantages ``[n, W-1]`` at the shifted labels."""
    mask = batch.labels[:, 1:] != IGNORE_INDEX
    return ops.reinforce_pp_advantages(rewards.to(mask.device).float(), mask,
                                       group_size=group_size if kind == "reinforce_pp_baseline" else None)


def correction_weights(batch, sampling_logps, cfg: GRPOConfig):
    """Detached per-token weights of the loss: rollout importance correction × off-policy sequence mask
    (None when both are off). Both compare the sampler's log-probs with the policy's at rollout time (TRL
    evaluates the off-policy mask at each optimizer step: the same for ``num_iterations = 1``)."""
    mask = batch.labels[:, 1:] != IGNORE_INDEX
    weights = None
    if cfg.rollout_is_correction != "none":
        weights = ops.rollout_is_weights(batch.old_logps, sampling_logps, mask, mode=cfg.rollout_is_correction,
                                         low=cfg.rollout_is_low or None, high=cfg.rollout_is_high)
    if cfg.off_policy_mask_threshold >= 0 and batch.advantages.dim() == 1:
        keep = ops.off_policy_mask(batch.old_logps, sampling_logps, batch.advantages, mask,
                                   threshold=cfg.off_policy_mask_threshold).expand(mask.shape)
        weights = keep if weights is None else weights * keep
    return weights


def concat_batches(batches, pad_id: int) -> GRPOBatch:
    """Rows of several rollouts in one right-padded batch (dynamic sampling's rounds)."""
    width = max(b.input_ids.shape[1] for b in batches)

    def cat(name, fill, per_token):
        parts = [getattr(b, name) for b in batches]
        if any(p is None for p in parts):
            return None
        w = width - 1 if per_token else width
        return torch.cat([torch.nn.functional.pad(p, (0, w - p.shape[1]), value=fill) if p.dim() == 2 else p
                          for p in parts])

    return GRPOBatch(cat("input_ids", pad_id, False), cat("attention_mask", 0, False),
                     cat("labels", IGNORE_INDEX, False), cat("advantages", 0.0, True), cat("old_logps", 0.0, True),
                     cat("ref_logps", 0.0, True), cat("token_weights", 0.0, True), cat("entropies", 0.0, True))


# ---------------------------------------------------------------------------------- training batch
@dataclass
class GRPOBatch:
    """Rows of a rollout, right-padded ``[n, W]``; per-token tensors are ``[n, W-1]`` aligned with the shifted
    labels (position t scores ``input_ids[:, t+1]``), 0 off the completion tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    advantages: torch.Tensor  # [n], or [n, W-1] per token (REINFORCE++)
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None  # [n, W-1] detached loss weights (rollout correction, masks)
    # [n, W-1] the policy's entropies at rollout time, for the entropy mask (set only when they are the
    # trained policy's: num_iterations = 1 and a rollout-time policy forward; see make_rollout)
    entropies: torch.Tensor | None = None

    def to(self, device):
        move = lambda t: None if t is None else t.to(device)
        return GRPOBatch(*(move(getattr(self, f)) for f in ("input_ids", "attention_mask", "labels", "advantages",
                                                            "old_logps", "ref_logps", "token_weights", "entropies")))

    def rows(self, idx) -> GRPOBatch:
        width = int(self.attention_mask[idx].sum(1).max())  # right padding: trailing pads change nothing
        cut = lambda t, w: None if t is None else t[idx, :w]
        adv = self.advantages[idx] if self.advantages.dim() == 1 else cut(self.advantages, width - 1)
        return GRPOBatch(self.input_ids[idx, :width], self.attention_mask[idx, :width], self.labels[idx, :width],
                         adv, cut(self.old_logps, width - 1), cut(self.ref_logps, width - 1),
                         cut(self.token_weights, width - 1), cut(self.entropies, width - 1))

    def num_completion_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def token_aligned(rollout: SampledCompletions, values, labels):
    """Per-completion-token ``values [N, T]`` (masked by the rollout) placed at the shifted label positions."""
    out = torch.zeros(labels.shape[0], labels.shape[1] - 1, dtype=torch.float32)
    out[labels[:, 1:] != IGNORE_INDEX] = values[rollout.completion_mask.bool()].float()
    return out


def _policy_forward_logps(policy_module: PolicyValueModel, batch, temperature, return_entropy=False):
    """Per-token log-probs ``[n, W-1]`` through the policy's own forward (where an FSDP2 root gathers its
    parameters) and its LM head, 0 off the labels; with ``return_entropy``, ``(logp, entropy)`` (the
    entropies from the same logits, 0 off the labels)."""
    hidden = policy_module(batch.input_ids, batch.attention_mask)[0]
    head = gathered(policy_module, lm_head(policy_module.lm))
    out = ops.token_logprobs(hidden[:, :-1], head.weight, batch.labels[:, 1:], bias=head.bias,
                             temperature=temperature, ignore_index=IGNORE_INDEX, return_entropy=return_entropy)
    on = batch.labels[:, 1:] != IGNORE_INDEX
    outs = [torch.where(on, x, torch.zeros_like(x)) for x in (out if return_entropy else (out,))]
    return tuple(outs) if return_entropy else outs[0]


@torch.no_grad()
def reference_logps(reference, policy_module: PolicyValueModel, batch, temperature):
    """The reference's per-token log-probs ``[n, W-1]`` at the sampling temperature (no gradient)."""
    if reference.name == "adapter":
        with policy_module.lm.disable_adapter():
            return _policy_forward_logps(policy_module, batch, temperature)
    if reference.name == "shared_trunk":
        reference.captured = None  # activations captured while generating are not this batch's
        return reference.token_logps(loading.Batch(batch.input_ids, batch.attention_mask, batch.labels)).float()
    model = reference.model
    if reference.offload:
        model.to(batch.input_ids.device)
    out = model(batch.input_ids, batch.attention_mask, batch.labels, temperature=temperature).float()
    if reference.offload:
        model.to("cpu")
    return out


@torch.no_grad()
def policy_logps(policy_module: PolicyValueModel, batch, temperature, return_entropy=False):
    """The policy's current per-token log-probs ``[n, W-1]`` (no gradient), as the loss computes them; with
    ``return_entropy``, ``(logp, entropy)`` from the same forward (what the loss's entropy mask needs)."""
    was_training = policy_module.training
    policy_module.eval()
    out = _policy_forward_logps(policy_module, batch, temperature, return_entropy=return_entropy)
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
    micro-batches for bnpo (each micro-batch's token mean counts once). The loss gives sums because its
    global counts are 1 (``num_items`` for dapo, ``num_sequences`` for grpo and dr_grpo): normalization
    itself happens once, in ``ops.policy.spec.row_scale`` and the trainer's division."""
    loss_type = cfg.loss_type
    # Gradient checkpointing recomputes layers without a KV cache, so the shared-prompt forward is off there.
    # The packed forward already runs no padding; it replaces the shared-prompt forward.
    share_prompts = cfg.share_prompt_forward and not cfg.gradient_checkpointing and not cfg.packed

    token_sums = loss_type in ("dapo", "cispo")

    def loss_fn(model, batch: GRPOBatch):
        labels, old, ref, tw = batch.labels[:, 1:], batch.old_logps, batch.ref_logps, batch.token_weights
        ent = batch.entropies  # the rollout-time policy's, when stored: the entropy mask without a pre-pass
        adv = batch.advantages if batch.advantages.dim() == 2 else None  # per token (REINFORCE++)
        if share_prompts:
            plen = prompt_lengths(batch)
            hidden, _ = model(batch.input_ids, batch.attention_mask, prompt_lengths=plen)
            labels, old, ref, tw, adv, ent = completion_aligned(plen, hidden.shape[1], labels, old, ref, tw, adv, ent)
        else:
            hidden, _ = model(batch.input_ids, batch.attention_mask)
            hidden = hidden[:, :-1]
        head = gathered(model, lm_head(unwrap(model).lm))  # the full head under FSDP2, read after the forward
        rows = batch.input_ids.shape[0]
        # Sums for the trainer's one division by the step's units: num_items / num_sequences of 1, and the entropy
        # bonus scaled the same way (a token sum for dapo/cispo, rows × the token mean for grpo/dr_grpo).
        entropy_items = 1 if token_sums else (batch.num_completion_tokens() / rows
                                              if loss_type in ("grpo", "dr_grpo") else None)
        loss, metrics = loss_module(hidden, head.weight, labels, advantages=batch.advantages if adv is None else adv,
                                    old_logps=old, ref_logps=ref, bias=head.bias, token_weights=tw,
                                    num_items=1, num_sequences=1, entropy_num_items=entropy_items, entropies=ent)
        n = weight_fn(batch)
        return loss, {k: v.detach() * n for k, v in metrics.items()}

    def weight_fn(batch: GRPOBatch):
        if token_sums:
            return batch.num_completion_tokens()
        return batch.input_ids.shape[0] if loss_type in ("grpo", "dr_grpo") else 1

    return loss_fn, weight_fn


def prompt_lengths(batch: GRPOBatch) -> torch.Tensor:
    """Each row's prompt length: the column of its first completion label (its whole length if it has none)."""
    has = batch.labels != IGNORE_INDEX
    return torch.where(has.any(1), has.int().argmax(1), batch.attention_mask.sum(1))


# ------------------------------------------------------------------------------------ rollout stream
class RolloutStream:
    """What the engine trainer pulls each step: the micro-batches of the current rollout, a new rollout (of the
    next prompt batch of ``prompts``, by ``sample_fn(rows, generator) -> (GRPOBatch, metrics)``) every
    ``num_iterations`` steps. The micro-batches hold ``micro_batch_size`` rows, or with
    ``max_tokens_per_microbatch`` up to that many forwarded tokens (:mod:`fastalign.engine.batching`). Its
    ``state_dict`` (prompt position, sampling RNG, pending rollout) makes resume exact."""

    def __init__(self, prompts: BatchStream, sample_fn, *, num_iterations: int, micro_batch_size: int,
                 generator: torch.Generator, max_tokens_per_microbatch: int = 0, packed: bool = False,
                 state: DistState | None = None):
        self.prompts, self.sample_fn, self.generator = prompts, sample_fn, generator
        self.num_iterations, self.micro_batch_size = num_iterations, micro_batch_size
        self.max_tokens, self.packed, self.state = max_tokens_per_microbatch, packed, state or DistState()
        self.pending: GRPOBatch | None = None
        self.uses_left = 0
        self.metrics: dict = {}

    def next(self):
        if self.pending is None or self.uses_left == 0:
            t0 = time.time()
            more_rows = lambda: self.prompts.next()[0]  # noqa: E731  (dynamic sampling asks for more prompts)
            self.pending, self.metrics = self.sample_fn(more_rows(), self.generator, more_rows=more_rows)
            self.metrics["rollout_s"] = time.time() - t0
            self.uses_left = self.num_iterations
        self.uses_left -= 1
        n = self.pending.input_ids.shape[0]
        if self.max_tokens:
            lengths = [[int(k)] for k in self.pending.attention_mask.sum(1)]
            groups = process_microbatches(lengths, self.max_tokens, packed=self.packed, state=self.state)
            return [self.pending.rows(torch.tensor(g)) for g in groups]
        micro = self.micro_batch_size or n
        return [self.pending.rows(torch.arange(s, min(s + micro, n))) for s in range(0, n, micro)]

    def state_dict(self):
        pending = None if self.pending is None else {f.name: getattr(self.pending, f.name) for f in fields(GRPOBatch)}
        return {"prompts": self.prompts.state_dict(), "generator": self.generator.get_state(), "pending": pending,
                "uses_left": self.uses_left, "metrics": self.metrics}

    def load_state_dict(self, s):
        self.prompts.load_state_dict(s["prompts"])
        self.generator.set_state(s["generator"])
        self.pending = None if s["pending"] is None else GRPOBatch(**s["pending"])
        self.uses_left, self.metrics = s["uses_left"], s["metrics"]


def make_rollout(policy, sampler, rewards, reference, tokenizer, cfg: GRPOConfig, state: DistState):
    """``sample(rows, generator) -> (GRPOBatch, metrics)``: sample, score, advantages, stored log-probs."""
    new_tokens = max_new_tokens(cfg)
    recompute_old = cfg.num_iterations > 1 and not hasattr(sampler, "model")  # vLLM log-probs are the engine's
    corrected = cfg.rollout_is_correction != "none" or cfg.off_policy_mask_threshold >= 0
    # The entropy mask from the rollout-time policy forward, when one runs and trains this very policy (one
    # iteration): the loss then skips its no-grad pre-pass. Later iterations' policies differ (TRL remasks).
    store_entropies = cfg.top_entropy_quantile < 1 and corrected and cfg.num_iterations == 1

    def sample_once(rows, generator):
        policy_module = unwrap(policy)
        prompt_ids = encode_prompts(tokenizer, rows, max_length=cfg.max_length, new_tokens=new_tokens)
        with gathered_for_generation(policy):
            rollout = sampler.sample(prompt_ids, max_new_tokens=new_tokens, temperature=cfg.temperature,
                                     top_p=cfg.top_p, top_k=cfg.top_k, stop_strings=cfg.stop_strings,
                                     num_samples=cfg.num_generations, batch_size=len(prompt_ids) * cfg.num_generations,
                                     generator=generator)
        completion_ids = rollout.completions()
        texts = decode(tokenizer, completion_ids)
        sample_rows = [rows[i] for i in rollout.prompt_index.tolist()]
        total, parts = rewards.score(sample_rows, texts, completion_ids)
        lengths = rollout.completion_mask.sum(1).float()
        if cfg.overlong_buffer:
            parts = dict(parts, overlong=overlong_penalty(lengths, new_tokens, cfg.overlong_buffer,
                                                          cfg.overlong_penalty))
            total = total + parts["overlong"].to(total.device)

        ids, attn, labels = rollout.training_batch(tokenizer.pad_token_id)
        batch = GRPOBatch(ids, attn, labels, total).to(state.device)
        if cfg.advantage.startswith("reinforce_pp"):
            batch.advantages = reinforce_pp_token_advantages(total, batch, cfg.advantage, cfg.num_generations)
        else:
            batch.advantages = compute_advantages(total, cfg.num_generations, cfg.advantage, state).to(state.device)
        if cfg.num_iterations > 1 or corrected:
            sampling = token_aligned(rollout, rollout.logprobs, labels).to(state.device)
            # The correction compares the sampler's log-probs with the policy's own, so those are recomputed.
            if store_entropies:
                batch.old_logps, batch.entropies = policy_logps(policy_module, batch, cfg.temperature,
                                                                return_entropy=True)
            elif recompute_old or corrected:
                batch.old_logps = policy_logps(policy_module, batch, cfg.temperature)
            else:
                batch.old_logps = sampling
            if corrected:
                batch.token_weights = correction_weights(batch, sampling, cfg)
        if reference is not None:
            batch.ref_logps = reference_logps(reference, policy_module, batch, cfg.temperature)

        n, groups = len(total), total.view(-1, cfg.num_generations)
        sums = {"reward": total.sum(), "reward_std": groups.std(1).sum(),
                "completion_length": rollout.completion_mask.sum()}
        counts = {"reward": n, "reward_std": len(groups), "completion_length": n}
        if len(parts) > 1:
            sums.update({f"reward/{k}": v.sum() for k, v in parts.items()})
            counts.update({f"reward/{k}": len(v) for k, v in parts.items()})
        metrics = global_means(sums, counts, state)
        metrics.update(verifier_means(sample_rows, verifier_rewards(sample_rows, texts), state))
        return batch, metrics, total

    def sample(rows, generator, more_rows=None):
        if not cfg.dynamic_sampling:
            return sample_once(rows, generator)[:2]
        return dynamic_sample(sample_once, rows, generator, more_rows, tokenizer.pad_token_id, cfg, state)

    return sample


def dynamic_sample(sample_once, rows, generator, more_rows, pad_id: int, cfg: GRPOConfig, state: DistState):
    """DAPO's dynamic sampling: keep the groups whose rewards differ, sample more prompts (from ``more_rows``)
    until ``len(rows)`` groups are kept or ``max_sampling_rounds`` rounds ran, then warn. Every process runs
    the same number of rounds (the rounds hold collectives); a process that is already full ignores the
    extra groups, and all keep as many groups as the process that found fewest (same micro-batches).
    Advantages are those of each round (group-local for ``group``/``rloo``; a round's batch for ``batch``
    and REINFORCE++). If no group has reward variance, the step trains on nothing: the rows are kept with
    every label ignored."""
    G, wanted = cfg.num_generations, len(rows)
    kept, kept_groups, rounds, metrics, last = [], 0, 0, {}, None
    while True:
        batch, round_metrics, total = sample_once(rows, generator)
        rounds += 1
        metrics = metrics or round_metrics
        last = batch
        informative = (~zero_variance_groups(total, G)).nonzero().flatten().tolist()
        room = wanted - kept_groups
        take = informative[:room]
        if take:
            idx = torch.tensor([g * G + j for g in take for j in range(G)], device=batch.input_ids.device)
            kept.append(batch.rows(idx))
            kept_groups += len(take)
        missing = all_reduce_sum(float(wanted - kept_groups), state)
        if missing <= 0 or rounds >= cfg.max_sampling_rounds:
            break
        rows = more_rows() if more_rows is not None else rows
    if missing > 0:
        warnings.warn(f"dynamic_sampling: after max_sampling_rounds={cfg.max_sampling_rounds} rounds only "
                      f"{kept_groups} of {wanted} groups on this process have rewards that differ; training on "
                      "those", stacklevel=2)
    if state.distributed:  # every process trains as many groups (the same micro-batches and collectives)
        fewest = torch.tensor([kept_groups], dtype=torch.int64)
        dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
        if int(fewest) < kept_groups:
            kept, kept_groups = [concat_batches(kept, pad_id).rows(torch.arange(int(fewest) * G))] \
                if int(fewest) else [], int(fewest)
    metrics = dict(metrics, sampling_rounds=float(rounds),
                   kept_groups=all_reduce_sum(float(kept_groups), state))
    if not kept:  # nothing informative: keep the shape of a batch, train on no token
        empty = last.rows(torch.arange(G, device=last.input_ids.device))
        empty.labels = torch.full_like(empty.labels, IGNORE_INDEX)
        kept = [empty]
    return concat_batches(kept, pad_id), metrics


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
    if cfg.fsdp and state.distributed and getattr(reference, "model", None) is not None:
        shard(reference.model, frozen=True, offload=cfg.fsdp_offload)  # frozen_copy: resharded after each forward
    policy = wrap_model(PolicyValueModel(lm, packed=cfg.packed), state, fsdp=cfg.fsdp, offload=cfg.fsdp_offload)
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
    # Each process samples its share of every prompt batch, with its own sampling RNG.
    prompts = BatchStream(rows, lambda examples, index: examples, batch_size=cfg.batch_size, state=state,
                          seed=cfg.seed)
    stream = RolloutStream(prompts, make_rollout(policy, sampler, rewards, reference, tokenizer, cfg, state),
                           num_iterations=cfg.num_iterations, micro_batch_size=cfg.micro_batch_size,
                           max_tokens_per_microbatch=cfg.max_tokens_per_microbatch, packed=cfg.packed, state=state,
                           generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * state.rank))

    # --- loss and loop --------------------------------------------------------------------------
    loss_module = FusedLinearGRPOLoss(
        beta=cfg.beta, loss_type=cfg.loss_type, epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high or None,
        temperature=cfg.temperature, max_completion_length=max_new_tokens(cfg), entropy_coef=cfg.entropy_coef,
        importance_sampling_level=cfg.importance_sampling_level, delta=cfg.delta or None,
        ratio_clip_c=cfg.ratio_clip_c or None, kl_bias_correction=bool(cfg.use_bias_correction_kl and cfg.beta > 0),
        top_entropy_quantile=cfg.top_entropy_quantile,
        entropy_group=dist.group.WORLD if state.distributed else None)
    loss_fn, weight_fn = grpo_loss_fn(loss_module, cfg)
    optimizer = build_optimizer(unwrap(policy).parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg)

    def on_step(step):
        if not isinstance(sampler, HFSampler):  # HF samples from the policy itself; vLLM holds a copy to sync
            sampler.load_weights(full_state_dict(lm))
        return dict(stream.metrics)

    result = train(cfg=cfg, run_dir=run_dir, model=policy, optimizer=optimizer, scheduler=scheduler, stream=stream,
                   loss_fn=loss_fn, weight_fn=weight_fn, state=state, desc="grpo", on_step=on_step)

    # --- evaluation on held-out prompts ------------------------------------------------------------
    report = {"flow": "grpo", "run_dir": str(run_dir), "steps": result.step, "loss_type": cfg.loss_type,
              "advantage": cfg.advantage, "beta": cfg.beta, "parameters": parameters,
              "reference": None if reference is None else reference.name}
    # An FSDP-sharded policy is gathered whole onto the main process first (a collective).
    trained = full_model(policy, state, lambda: PolicyValueModel(load_from_config(cfg, start)))
    if state.is_main:
        trained = trained.lm
        report.update(evaluation.online_policy_report(cfg, trained, tokenizer, start, state.device)[0])

        # --- report: the trained policy and the numbers ------------------------------------------------
        save_pretrained(trained, tokenizer, run_dir / "model")
        write_json(run_dir / "eval.json", report)
        print(f"grpo: {report}")
    shutdown(state)
    return report
