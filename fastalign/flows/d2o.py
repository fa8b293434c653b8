"""D²O: alignment from human negatives alone (Duan et al. 2024), with gradient ascent as the baseline.

Each prompt comes with a human negative ``y_l`` only (TRL's ``prompt``/``rejected`` columns, or
the negatives of the built-in tasks; chosen answers are never read). K responses sampled from the
reference policy (the starting model) stand in for the positive:
``L = −log σ((β/K)·Σ_k log π/π_ref (y_k) − α·log π/π_ref (y_l))``. The paper assumes a model whose own
answers are mostly acceptable; ``sample_prefix`` (e.g. a value instruction) draws the K samples from the
instruction-prompted starting model instead, for a model that gives the negative unless asked not to; every
log-prob is still taken after the plain prompt. ``objective: ga`` trains the
paper's gradient-ascent baseline instead: minimize ``log π(y_l)`` (no samples, no reference).

Supports: the reference strategies ``frozen_copy``, ``adapter``, ``shared_trunk``; samples drawn
with the shared sampler (:func:`fastalign.engine.generation.sample`) and refreshed every
``resample_every`` steps; DDP/FSDP2 under torchrun; gradient accumulation; exact resume.

Assumptions: samples are drawn lazily for the prompts of each batch, each prompt's K from its own
generator seeded by (seed, refresh round, row): the same samples whatever the batch composition,
so a resumed run sees the ones it would have seen. Sampling uses a separate frozen copy of the
starting model (the reference policy π_r), whatever the reference strategy. Held-out evaluation
(task verifiers, KL to the start) in ``<run>/eval.json``.

Run: ``fastalign d2o --config configs/d2o.yaml [--key value ...]``.
"""

from __future__ import annotations

import torch

from fastalign import ops
from fastalign.data import loading, tasks
from fastalign.engine import checkpoint as ckpt
from fastalign.engine import evaluation
from fastalign.engine.config import D2OConfig
from fastalign.engine.distributed import full_model, shutdown, unwrap, wrap_model
from fastalign.engine.generation import make_sampler
from fastalign.engine.optim import build_optimizer, build_scheduler
from fastalign.engine.runs import start_run, write_json
from fastalign.engine.trainer import BatchStream, train
from fastalign.icl import prompts as icl_prompts
from fastalign.models.heads import CausalLMLogprobs, target_mask
from fastalign.models.loading import load_causal_lm, load_from_config, load_tokenizer, save_pretrained
from fastalign.models.reference import build_reference, sequence_logps

FILE_MAX_NEW_TOKENS = 16  # sample length for prompts that are not built-in tasks (when max_new_tokens = 0)


def sample_length(cfg: D2OConfig) -> int:
    if cfg.max_new_tokens:
        return cfg.max_new_tokens
    names = tasks.parse_task_spec(cfg.dataset)
    return max(tasks.get_task(n).max_new_tokens for n in names) if names else FILE_MAX_NEW_TOKENS


class ReferenceSamples:
    """K completions per dataset row from the reference policy, per refresh round, drawn when first needed."""

    def __init__(self, sampler, cfg: D2OConfig, start_step: int = 0):
        self.sampler, self.cfg = sampler, cfg
        self.step = start_step
        self.cache: dict[int, tuple[int, list]] = {}

    def round(self) -> int:
        return self.step // self.cfg.resample_every if self.cfg.resample_every else 0

    def on_step(self, step):
        self.step = step
        return None

    def get(self, row: int, prompt_ids: list[int]) -> list[list[int]]:
        """Row ``row``'s K completions, drawn after ``prompt_ids`` (the prompt as the samples see it)."""
        r = self.round()
        hit = self.cache.get(row)
        if hit is None or hit[0] != r:
            g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + r) * 1_000_033 + row)
            rollout = self.sampler.sample([prompt_ids], max_new_tokens=sample_length(self.cfg),
                                          temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                          num_samples=self.cfg.num_samples, batch_size=self.cfg.num_samples,
                                          generator=g)
            hit = (r, rollout.completions())
            self.cache[row] = hit
        return hit[1]


def encode_negative(tokenizer, row, sample_prefix=""):
    """The prompt, its negative, and the prompt the K samples are drawn after: ``sample_prefix`` as the ICL flow
    puts a value instruction (before a plain prompt; a system message before a conversation)."""
    prompt = loading.encode_prompt(tokenizer, row["prompt"])
    sample_prompt = icl_prompts.encode(tokenizer, row["prompt"], instruction=sample_prefix) if sample_prefix else prompt
    return {"prompt": prompt, "rejected": loading.encode_completion(tokenizer, row["rejected"]),
            "sample_prompt": sample_prompt}


def collate_groups(examples, index, pad_id, max_length, samples: ReferenceSamples | None):
    """Per prompt: its K samples (none for ``ga``), then its negative — FusedLinearD2OLoss's layout."""
    rows = []
    for e, i in zip(examples, index):
        completions = samples.get(int(i), e["sample_prompt"]) if samples is not None else []
        for c in [*completions, e["rejected"]]:
            p, c = loading._fit(e["prompt"], c, max_length)
            rows.append({"input_ids": p + c, "labels": [loading.IGNORE_INDEX] * len(p) + c})
    return loading.collate(rows, pad_id, index)


def _start_step(cfg, run_dir) -> int:
    last = ckpt.latest_checkpoint(run_dir) if cfg.resume else None
    return int(ckpt.read_trainer_state(last)["step"]) if last is not None else 0  # no pickle: see checkpoint.py


def run(cfg: D2OConfig) -> dict:
    # --- config, run folder -------------------------------------------------------------------
    state, run_dir = start_run(cfg, "d2o")
    start = cfg.init_from or cfg.model
    d2o = cfg.objective == "d2o"

    # --- models: policy, tokenizer, the sampling reference policy --------------------------------
    tokenizer = load_tokenizer(cfg.tokenizer or start)
    policy = CausalLMLogprobs(load_from_config(cfg, start, device=state.device))
    samples = None
    if d2o:
        sampling_lm = load_causal_lm(start, dtype=cfg.dtype, device=state.device).eval().requires_grad_(False)
        samples = ReferenceSamples(make_sampler("hf", sampling_lm, tokenizer), cfg, _start_step(cfg, run_dir))

    # --- data: prompts and their negatives only ---------------------------------------------------
    rows = loading.load_rows(cfg.dataset, "negatives", n=cfg.num_examples, seed=cfg.seed)
    examples = [encode_negative(tokenizer, r, cfg.sample_prefix) for r in rows]
    collate_fn = lambda ex, idx: collate_groups(ex, idx, tokenizer.pad_token_id, cfg.max_length, samples)
    stream = BatchStream(examples, collate_fn, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                         state=state, seed=cfg.seed)

    # --- reference (before wrapping: shared_trunk decides which layers train) -------------------
    reference = build_reference(cfg.reference, policy, cfg) if d2o else None
    if state.is_main and reference is not None:
        print(f"reference: {reference.name}, +{reference.extra_bytes / 2**20:.1f} MiB over the policy")
    model = wrap_model(policy, state, fsdp=cfg.fsdp)
    k = cfg.num_samples

    # --- loss and loop --------------------------------------------------------------------------
    def loss_fn(model, batch):
        logp = ops.sequence_logprobs(model(batch.input_ids, batch.attention_mask, batch.labels),
                                     target_mask(batch.labels))
        if not d2o:  # gradient ascent on the negatives: push their log-probs down, nothing holds them
            return logp.sum(), {"logp_negative": logp.detach().sum()}
        ref = sequence_logps(reference, batch, False)
        groups = logp.view(-1, k + 1)
        ref_groups = ref.view(-1, k + 1)
        losses, metrics = ops.d2o_loss(groups[:, :k], ref_groups[:, :k], groups[:, k], ref_groups[:, k],
                                       beta=cfg.beta, alpha=cfg.alpha)
        n = groups.shape[0]
        return losses.sum(), {"reward_samples": n * metrics["rewards/samples"],
                              "reward_negative": n * metrics["rewards/negative"],
                              "reward_acc": n * metrics["rewards/accuracies"],
                              "logp_negative": groups[:, k].detach().sum()}

    optimizer = build_optimizer(unwrap(model).parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    result = train(cfg=cfg, run_dir=run_dir, model=model, optimizer=optimizer, scheduler=scheduler, stream=stream,
                   loss_fn=loss_fn, weight_fn=lambda b: b.index.shape[0], state=state, desc=f"d2o ({cfg.objective})",
                   on_step=samples.on_step if samples is not None else None)

    # --- evaluation on held-out data -------------------------------------------------------------
    trained = full_model(model, state, lambda: CausalLMLogprobs(load_from_config(cfg, start)))
    lm = trained.lm if trained is not None else None
    report = {"flow": "d2o", "objective": cfg.objective, "run_dir": str(run_dir), "steps": result.step,
              "num_samples": k if d2o else 0,
              "final_train_loss": result.history[-1]["loss"] if result.history else None}
    if state.is_main:
        prompts = evaluation.heldout_rows(cfg, "prompts")
        start_lm = load_causal_lm(start, dtype=cfg.dtype, device=state.device) if prompts else None
        report.update(evaluation.policy_metrics(cfg, lm, tokenizer, start_lm, prompts))
        save_pretrained(lm, tokenizer, run_dir / "model")
        write_json(run_dir / "eval.json", report)
        print(f"d2o: {report}")
    shutdown(state)
    return report
