"""KTO: unpaired thumbs-up / thumbs-down completions against a frozen reference (TRL's ``KTOTrainer``).

Supports: TRL's unpaired rows (``prompt``/``completion``/``label``), paired rows or built-in tasks
split into a desirable and an undesirable half; the reference strategies ``frozen_copy``,
``adapter``, ``shared_trunk``; DDP/FSDP2 under torchrun; gradient accumulation; exact resume.

Assumptions: the reference point z₀ is estimated per micro-batch from mismatched pairs (each
prompt with the previous row's completion, as TRL builds them), ``max(0, mean(logπ − logπ_ref))``
without gradient; log-probs are summed over completion tokens; the loss is the mean over the
global batch's completions. Held-out evaluation (task verifiers, KL to the start) in
``<run>/eval.json``.

Run: ``fastalign kto --config configs/kto.yaml [--key value ...]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastalign import ops
from fastalign.data import loading
from fastalign.engine import evaluation
from fastalign.engine.config import KTOConfig
from fastalign.engine.distributed import full_model, shutdown, unwrap, wrap_model
from fastalign.engine.optim import build_optimizer, build_scheduler
from fastalign.engine.runs import start_run, write_json
from fastalign.engine.trainer import BatchStream, train
from fastalign.models.heads import CausalLMLogprobs, target_mask
from fastalign.models.loading import load_causal_lm, load_from_config, load_tokenizer, save_pretrained
from fastalign.models.reference import build_reference, sequence_logps


@dataclass
class UnpairedBatch(loading.Batch):
    """``[2B, T]``: the B completions, then their B mismatched pairs; ``desirable [B]``."""

    desirable: torch.Tensor | None = None

    def to(self, device):
        moved = super().to(device)
        return UnpairedBatch(moved.input_ids, moved.attention_mask, moved.labels, moved.position_ids, moved.index,
                             self.desirable.to(device))


def encode_unpaired(tokenizer, row):
    return {"prompt": loading.encode_prompt(tokenizer, row["prompt"]),
            "completion": loading.encode_completion(tokenizer, row["completion"]), "label": bool(row["label"])}


def collate_unpaired(examples, pad_id, max_length, index=None):
    """Completions first, then each prompt with the previous example's completion (TRL's KL pairs)."""
    def encoded(prompt, completion):
        p, c = loading._fit(prompt, completion, max_length)
        return {"input_ids": p + c, "labels": [loading.IGNORE_INDEX] * len(p) + c}

    shifted = examples[-1:] + examples[:-1]
    rows = ([encoded(e["prompt"], e["completion"]) for e in examples]
            + [encoded(e["prompt"], s["completion"]) for e, s in zip(examples, shifted)])
    b = loading.collate(rows, pad_id)
    index = None if index is None else torch.as_tensor(index)
    return UnpairedBatch(b.input_ids, b.attention_mask, b.labels, None, index,
                         torch.tensor([e["label"] for e in examples], dtype=torch.bool))


def run(cfg: KTOConfig) -> dict:
    # --- config, run folder -------------------------------------------------------------------
    state, run_dir = start_run(cfg, "kto")
    start = cfg.init_from or cfg.model

    # --- models: policy, tokenizer ------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.tokenizer or start)
    policy = CausalLMLogprobs(load_from_config(cfg, start, device=state.device))

    # --- data -------------------------------------------------------------------------------
    rows = loading.load_rows(cfg.dataset, "unpaired", n=cfg.num_examples, seed=cfg.seed)
    examples = [encode_unpaired(tokenizer, r) for r in rows]
    collate_fn = lambda ex, idx: collate_unpaired(ex, tokenizer.pad_token_id, cfg.max_length, idx)
    stream = BatchStream(examples, collate_fn, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                         state=state, seed=cfg.seed)

    # --- reference (before wrapping: shared_trunk decides which layers train) -------------------
    reference = build_reference(cfg.reference, policy, cfg)
    if state.is_main:
        print(f"reference: {reference.name}, +{reference.extra_bytes / 2**20:.1f} MiB over the policy")
    model = wrap_model(policy, state, fsdp=cfg.fsdp)

    # --- loss and loop --------------------------------------------------------------------------
    def loss_fn(model, batch):
        n = batch.desirable.shape[0]
        logp = ops.sequence_logprobs(model(batch.input_ids, batch.attention_mask, batch.labels),
                                     target_mask(batch.labels))
        ref = sequence_logps(reference, batch, False)
        kl_ref = (logp[n:].detach() - ref[n:]).mean().clamp(min=0)
        losses, metrics = ops.kto_loss(logp[:n], ref[:n], batch.desirable, kl_ref, beta=cfg.beta,
                                       desirable_weight=cfg.desirable_weight,
                                       undesirable_weight=cfg.undesirable_weight)
        rewards = cfg.beta * (logp[:n].detach() - ref[:n])
        return losses.sum(), {"kl": kl_ref * n, "reward_desirable": (rewards * batch.desirable).sum(),
                              "reward_undesirable": (rewards * ~batch.desirable).sum(),
                              "desirable_fraction": batch.desirable.float().sum()}

    optimizer = build_optimizer(unwrap(model).parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    result = train(cfg=cfg, run_dir=run_dir, model=model, optimizer=optimizer, scheduler=scheduler, stream=stream,
                   loss_fn=loss_fn, weight_fn=lambda b: b.desirable.shape[0], state=state, desc="kto")

    # --- evaluation on held-out data -------------------------------------------------------------
    trained = full_model(model, state, lambda: CausalLMLogprobs(load_from_config(cfg, start)))
    lm = trained.lm if trained is not None else None
    report = {"flow": "kto", "run_dir": str(run_dir), "steps": result.step, "reference": cfg.reference,
              "final_train_loss": result.history[-1]["loss"] if result.history else None}
    if state.is_main:
        heldout = evaluation.heldout_rows(cfg, "preferences")
        prompts = evaluation.heldout_rows(cfg, "prompts")
        start_lm = load_causal_lm(start, dtype=cfg.dtype, device=state.device) if heldout or prompts else None
        if heldout is not None:
            enc = [loading.encode_preference(tokenizer, r, cfg.max_length) for r in heldout]
            pc, pr = evaluation.sequence_logps(lm, tokenizer, enc)
            rc, rr = evaluation.sequence_logps(start_lm, tokenizer, enc)
            report["eval_reward_accuracy"] = float(((pc - rc) > (pr - rr)).float().mean())
        report.update(evaluation.policy_metrics(cfg, lm, tokenizer, start_lm, prompts))
        save_pretrained(lm, tokenizer, run_dir / "model")
        write_json(run_dir / "eval.json", report)
        print(f"kto: {report}")
    shutdown(state)
    return report
