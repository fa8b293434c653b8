"""ORPO: odds-ratio preference optimization, ``NLL_w − λ·log σ(log_odds)``, no reference model.

Supports: built-in tasks or prompt/chosen/rejected datasets (plain or conversational); LoRA;
DDP/FSDP2 under torchrun; gradient accumulation; exact resume.

Assumptions: the odds use length-averaged log-probs (as TRL and Liger); the NLL is the mean over
each micro-batch's chosen completion tokens, weighted by its pairs (one micro-batch: exactly TRL's
and Liger's); the starting model is loaded only at the end, to report KL and held-out preference
accuracy in ``<run>/eval.json``.

Run: ``fastalign orpo --config configs/orpo.yaml [--key value ...]``.
"""

from __future__ import annotations

from fastalign import ops
from fastalign.data import loading
from fastalign.engine import evaluation
from fastalign.engine.config import ORPOConfig
from fastalign.engine.distributed import full_model, shutdown, unwrap, wrap_model
from fastalign.engine.optim import build_optimizer, build_scheduler
from fastalign.engine.runs import start_run, write_json
from fastalign.engine.trainer import BatchStream, train
from fastalign.models.heads import CausalLMLogprobs, target_mask
from fastalign.models.loading import load_causal_lm, load_from_config, load_tokenizer, save_pretrained


def run(cfg: ORPOConfig) -> dict:
    # --- config, run folder -------------------------------------------------------------------
    state, run_dir = start_run(cfg, "orpo")
    start = cfg.init_from or cfg.model

    # --- model and tokenizer ------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.tokenizer or start)
    model = wrap_model(CausalLMLogprobs(load_from_config(cfg, start, device=state.device)), state, fsdp=cfg.fsdp)

    # --- data -------------------------------------------------------------------------------
    rows = loading.load_rows(cfg.dataset, "preferences", n=cfg.num_examples, seed=cfg.seed)
    pairs = [loading.encode_preference(tokenizer, r, cfg.max_length) for r in rows]
    collate_fn = lambda ex, idx: loading.collate_preferences(ex, tokenizer.pad_token_id, idx)
    stream = BatchStream(pairs, collate_fn, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                         max_tokens_per_microbatch=cfg.max_tokens_per_microbatch, state=state, seed=cfg.seed)

    # --- loss and loop --------------------------------------------------------------------------
    def loss_fn(model, batch):
        n = batch.input_ids.shape[0] // 2  # chosen rows first, then rejected
        tok = model(batch.input_ids, batch.attention_mask, batch.labels)
        mask = target_mask(batch.labels)
        avg = ops.sequence_logprobs(tok, mask, average=True)
        losses, metrics = ops.orpo_loss(avg[:n], avg[n:], beta=cfg.beta)
        nll = -(tok[:n] * mask[:n]).sum() / mask[:n].sum().clamp(min=1)
        return losses.sum() + n * nll, {"nll": n * nll.detach(), "log_odds_ratio": n * metrics["log_odds_ratio"],
                                        "reward_acc": n * metrics["rewards/accuracies"],
                                        "margin": n * metrics["rewards/margins"]}

    optimizer = build_optimizer(unwrap(model).parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    result = train(cfg=cfg, run_dir=run_dir, model=model, optimizer=optimizer, scheduler=scheduler, stream=stream,
                   loss_fn=loss_fn, weight_fn=lambda b: b.input_ids.shape[0] // 2, state=state, desc="orpo")

    # --- evaluation on held-out data -------------------------------------------------------------
    # An FSDP-sharded model is gathered whole onto the main process first.
    trained = full_model(model, state, lambda: CausalLMLogprobs(load_from_config(cfg, start)))
    lm = trained.lm if trained is not None else None
    report = {"flow": "orpo", "run_dir": str(run_dir), "steps": result.step,
              "final_train_loss": result.history[-1]["loss"] if result.history else None}
    if state.is_main:
        heldout = evaluation.heldout_rows(cfg, "preferences")
        prompts = evaluation.heldout_rows(cfg, "prompts")
        start_lm = load_causal_lm(start, dtype=cfg.dtype, device=state.device) if heldout or prompts else None
        if heldout is not None:
            enc = [loading.encode_preference(tokenizer, r, cfg.max_length) for r in heldout]
            pc, pr = evaluation.sequence_logps(lm, tokenizer, enc, average=True)
            report["eval_reward_accuracy"] = float((pc > pr).float().mean())
            report["eval_margin"] = float(cfg.beta * (pc - pr).mean())
        report.update(evaluation.policy_metrics(cfg, lm, tokenizer, start_lm, prompts))

        # --- report: the trained policy and the numbers --------------------------------------------
        save_pretrained(lm, tokenizer, run_dir / "model")
        write_json(run_dir / "eval.json", report)
        print(f"orpo: {report}")
    shutdown(state)
    return report
