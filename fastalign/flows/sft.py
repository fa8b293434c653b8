"""Supervised fine-tuning: next-token loss on completions, prompts masked.

Supports: ``model=tiny`` (the built-in default), local folders and hub ids; built-in tasks, JSONL /
Parquet / hub datasets in prompt/completion or messages format; padding-free training (``packed``, or
``packing`` at collate time); LoRA; DDP and FSDP2 under torchrun; gradient accumulation (``micro_batch_size``
or ``max_tokens_per_microbatch``); exact resume (``--resume``).

Assumptions: the loss is the mean NLL over all target tokens of the global batch (each token
weighs the same, whatever its sequence's length); no evaluation during training — the held-out
evaluation runs once at the end and is written to ``<run>/eval.json``.

Run: ``fastalign sft --config configs/sft.yaml [--key value ...]``.
"""

from __future__ import annotations

import torch

from fastalign.data import loading
from fastalign.engine import evaluation
from fastalign.engine.config import SFTConfig
from fastalign.engine.distributed import full_model, shutdown, unwrap, wrap_model
from fastalign.engine.optim import build_optimizer, build_scheduler
from fastalign.engine.runs import start_run, write_json
from fastalign.engine.trainer import BatchStream, train
from fastalign.models.heads import CausalLMLogprobs, target_mask
from fastalign.models.loading import load_from_config, load_tokenizer, save_pretrained


def run(cfg: SFTConfig) -> dict:
    # --- config, run folder -------------------------------------------------------------------
    state, run_dir = start_run(cfg, "sft")

    # --- model and tokenizer ------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    lm = load_from_config(cfg, device=state.device)
    model = wrap_model(CausalLMLogprobs(lm, packed=cfg.packed), state, fsdp=cfg.fsdp)

    # --- data -------------------------------------------------------------------------------
    rows = loading.load_rows(cfg.dataset, "sft", n=cfg.num_examples, seed=cfg.seed)
    examples = [loading.encode_sft(tokenizer, r, cfg.max_length) for r in rows]
    if cfg.packing:
        collate_fn = lambda ex, idx: loading.collate_packed(ex)
    else:
        collate_fn = lambda ex, idx: loading.collate(ex, tokenizer.pad_token_id)
    stream = BatchStream(examples, collate_fn, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                         max_tokens_per_microbatch=cfg.max_tokens_per_microbatch, state=state, seed=cfg.seed,
                         packed=cfg.packed or cfg.packing)

    # --- loss and loop --------------------------------------------------------------------------
    def loss_fn(model, batch):
        logp = model(batch.input_ids, batch.attention_mask, batch.labels, batch.position_ids)
        return -logp.sum(), {}  # the trainer divides by the global number of target tokens

    optimizer = build_optimizer(unwrap(model).parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    result = train(cfg=cfg, run_dir=run_dir, model=model, optimizer=optimizer, scheduler=scheduler, stream=stream,
                   loss_fn=loss_fn, weight_fn=lambda b: b.num_target_tokens(), state=state, desc="sft")

    # --- evaluation on held-out data -------------------------------------------------------------
    # An FSDP-sharded model is gathered whole onto the main process first.
    trained = full_model(model, state, lambda: CausalLMLogprobs(load_from_config(cfg)))
    lm = trained.lm if trained is not None else None
    report = {"flow": "sft", "run_dir": str(run_dir), "steps": result.step,
              "final_train_loss": result.history[-1]["loss"] if result.history else None}
    if state.is_main:
        heldout = evaluation.heldout_rows(cfg, "sft")
        if heldout is not None:
            report["eval_loss"] = heldout_loss(lm, tokenizer, heldout, cfg.max_length)
        report.update(evaluation.task_metrics(lm, tokenizer, cfg.dataset, n=cfg.num_eval_examples, seed=cfg.seed,
                                              batch_size=cfg.eval_batch_size))

        # --- report: the trained model and the numbers ---------------------------------------------
        save_pretrained(lm, tokenizer, run_dir / "model")
        write_json(run_dir / "eval.json", report)
        print(f"sft: {report}")
    shutdown(state)
    return report


@torch.no_grad()
def heldout_loss(lm, tokenizer, rows, max_length, batch_size=128) -> float:
    """Mean NLL per target token over held-out rows."""
    model = CausalLMLogprobs(lm).eval()
    device = next(lm.parameters()).device
    examples = [loading.encode_sft(tokenizer, r, max_length) for r in rows]
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = loading.collate(examples[start:start + batch_size], tokenizer.pad_token_id).to(device)
        total -= float(model(batch.input_ids, batch.attention_mask, batch.labels).sum())
        count += int(target_mask(batch.labels).sum())
    lm.train()
    return total / max(count, 1)
