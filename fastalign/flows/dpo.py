"""Direct Preference Optimization: ``loss_type`` sigmoid | hinge | ipo | robust against a frozen reference.

Supports: every reference strategy of :mod:`fastalign.models.reference` (``frozen_copy`` with
optional bf16/offload, ``adapter`` for LoRA policies, ``precomputed`` on disk, ``shared_trunk``);
built-in tasks or prompt/chosen/rejected datasets (plain or conversational); DDP/FSDP2 under
torchrun; gradient accumulation (``micro_batch_size`` or ``max_tokens_per_microbatch``); the padding-free
packed forward (``packed``); exact resume.

Assumptions: the policy and the reference start from the same weights (``init_from``, else
``model``); IPO uses length-averaged log-probs as TRL does, the others sequence sums; the loss is
the mean over the global batch's pairs. The final evaluation (held-out preference accuracy, task
verifiers, KL to the starting model) is written to ``<run>/eval.json``.

Run: ``fastalign dpo --config configs/dpo.yaml [--key value ...]``.
"""

from __future__ import annotations

from fastalign import ops
from fastalign.data import loading
from fastalign.engine import evaluation
from fastalign.engine.config import DPOConfig
from fastalign.engine.distributed import full_model, shutdown, unwrap, wrap_model
from fastalign.engine.optim import build_optimizer, build_scheduler
from fastalign.engine.runs import start_run, write_json
from fastalign.engine.trainer import BatchStream, train
from fastalign.models.heads import CausalLMLogprobs, target_mask
from fastalign.models.loading import load_causal_lm, load_from_config, load_tokenizer, save_pretrained
from fastalign.models.reference import build_reference, sequence_logps


def run(cfg: DPOConfig) -> dict:
    # --- config, run folder -------------------------------------------------------------------
    state, run_dir = start_run(cfg, "dpo")
    start = cfg.init_from or cfg.model

    # --- models: policy, tokenizer ------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.tokenizer or start)
    policy = CausalLMLogprobs(load_from_config(cfg, start, device=state.device), packed=cfg.packed)

    # --- data -------------------------------------------------------------------------------
    rows = loading.load_rows(cfg.dataset, "preferences", n=cfg.num_examples, seed=cfg.seed)
    pairs = [loading.encode_preference(tokenizer, r, cfg.max_length) for r in rows]
    collate_fn = lambda ex, idx: loading.collate_preferences(ex, tokenizer.pad_token_id, idx)
    stream = BatchStream(pairs, collate_fn, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                         max_tokens_per_microbatch=cfg.max_tokens_per_microbatch, state=state, seed=cfg.seed,
                         packed=cfg.packed)

    # --- reference (before wrapping: shared_trunk decides which layers train) -------------------
    reference = build_reference(cfg.reference, policy, cfg, pairs=pairs, collate_fn=collate_fn)
    if state.is_main:
        print(f"reference: {reference.name}, +{reference.extra_bytes / 2**20:.1f} MiB over the policy")
    model = wrap_model(policy, state, fsdp=cfg.fsdp)
    average = cfg.loss_type == "ipo"

    # --- loss and loop --------------------------------------------------------------------------
    def loss_fn(model, batch):
        n = batch.input_ids.shape[0] // 2  # chosen rows first, then rejected
        logp = ops.sequence_logprobs(model(batch.input_ids, batch.attention_mask, batch.labels),
                                     target_mask(batch.labels), average=average)
        ref = sequence_logps(reference, batch, average)  # after the policy: shared_trunk reuses its activations
        losses, chosen_r, rejected_r = ops.dpo_loss(logp[:n], logp[n:], ref[:n], ref[n:], beta=cfg.beta,
                                                    loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
        return losses.sum(), {"reward_chosen": chosen_r.sum(), "reward_rejected": rejected_r.sum(),
                              "reward_acc": (chosen_r > rejected_r).float().sum(),
                              "margin": (chosen_r - rejected_r).sum()}

    optimizer = build_optimizer(unwrap(model).parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    result = train(cfg=cfg, run_dir=run_dir, model=model, optimizer=optimizer, scheduler=scheduler, stream=stream,
                   loss_fn=loss_fn, weight_fn=lambda b: b.input_ids.shape[0] // 2, state=state, desc="dpo")

    # --- evaluation on held-out data -------------------------------------------------------------
    # An FSDP-sharded model is gathered whole onto the main process first.
    trained = full_model(model, state, lambda: CausalLMLogprobs(load_from_config(cfg, start)))
    lm = trained.lm if trained is not None else None
    report = {"flow": "dpo", "run_dir": str(run_dir), "steps": result.step, "loss_type": cfg.loss_type,
              "reference": cfg.reference, "reference_extra_mib": reference.extra_bytes / 2**20,
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
            report["eval_margin"] = float(cfg.beta * ((pc - rc) - (pr - rr)).mean())
        report.update(evaluation.policy_metrics(cfg, lm, tokenizer, start_lm, prompts))

        # --- report: the trained policy and the numbers --------------------------------------------
        save_pretrained(lm, tokenizer, run_dir / "model")
        write_json(run_dir / "eval.json", report)
        print(f"dpo: {report}")
    shutdown(state)
    return report
