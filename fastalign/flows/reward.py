"""Reward model: a causal LM trunk + scalar head trained with the Bradley-Terry loss on preference pairs.

Supports: built-in tasks or prompt/chosen/rejected datasets (plain or conversational); optional
margin and reward centering (``center_coef``); LoRA; DDP/FSDP2 under torchrun; gradient
accumulation; exact resume.

Assumptions: the reward is read at each sequence's last real token (right padding); the LM head
is frozen (unused). The final evaluation — held-out pair accuracy, overall and per task — is
written to ``<run>/eval.json``; the model is saved as ``<run>/model`` (causal LM folder +
``scalar_head.safetensors``, loadable with ``ScalarHeadModel.load``).

Run: ``fastalign reward --config configs/reward.yaml [--key value ...]``.
"""

from __future__ import annotations

import torch

from fastalign import ops
from fastalign.data import loading
from fastalign.engine.config import RewardConfig
from fastalign.engine.distributed import full_model, shutdown, unwrap, wrap_model
from fastalign.engine.evaluation import heldout_rows
from fastalign.engine.optim import build_optimizer, build_scheduler
from fastalign.engine.runs import start_run, write_json
from fastalign.engine.trainer import BatchStream, train
from fastalign.models.heads import ScalarHeadModel
from fastalign.models.loading import load_from_config, load_tokenizer


def run(cfg: RewardConfig) -> dict:
    # --- config, run folder -------------------------------------------------------------------
    state, run_dir = start_run(cfg, "reward")
    start = cfg.init_from or cfg.model

    # --- model and tokenizer ------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.tokenizer or start)
    reward_model = ScalarHeadModel(load_from_config(cfg, start, device=state.device)).to(state.device)
    model = wrap_model(reward_model, state, fsdp=cfg.fsdp)

    # --- data -------------------------------------------------------------------------------
    rows = loading.load_rows(cfg.dataset, "preferences", n=cfg.num_examples, seed=cfg.seed)
    pairs = [loading.encode_preference(tokenizer, r, cfg.max_length) for r in rows]
    collate_fn = lambda ex, idx: loading.collate_preferences(ex, tokenizer.pad_token_id, idx)
    stream = BatchStream(pairs, collate_fn, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                         max_tokens_per_microbatch=cfg.max_tokens_per_microbatch, state=state, seed=cfg.seed)

    # --- loss and loop --------------------------------------------------------------------------
    def loss_fn(model, batch):
        n = batch.input_ids.shape[0] // 2  # chosen rows first, then rejected
        rewards = model(batch.input_ids, batch.attention_mask)
        loss, metrics = ops.bradley_terry_loss(rewards[:n], rewards[n:], margin=cfg.margin or None,
                                               center_coef=cfg.center_coef)
        # Per-pair sums, so the trainer's division by the global pair count gives the batch mean.
        return loss * n, {"accuracy": metrics["accuracy"] * n, "margin": metrics["margin"] * n}

    optimizer = build_optimizer(unwrap(model).parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    result = train(cfg=cfg, run_dir=run_dir, model=model, optimizer=optimizer, scheduler=scheduler, stream=stream,
                   loss_fn=loss_fn, weight_fn=lambda b: b.input_ids.shape[0] // 2, state=state, desc="reward")

    # --- evaluation on held-out pairs -------------------------------------------------------------
    # An FSDP-sharded model is gathered whole onto the main process first.
    trained = full_model(model, state, lambda: ScalarHeadModel(load_from_config(cfg, start)))
    report = {"flow": "reward", "run_dir": str(run_dir), "steps": result.step,
              "final_train_loss": result.history[-1]["loss"] if result.history else None}
    if state.is_main:
        heldout = heldout_rows(cfg, "preferences")
        if heldout is not None:
            report.update(pair_accuracy(trained, tokenizer, heldout, cfg.max_length))

        # --- report: the trained reward model and the numbers --------------------------------------
        trained.save(run_dir / "model", tokenizer)
        write_json(run_dir / "eval.json", report)
        print(f"reward: {report}")
    shutdown(state)
    return report


@torch.no_grad()
def pair_accuracy(reward_model, tokenizer, rows, max_length, batch_size=128) -> dict:
    """Held-out accuracy ``mean(r_chosen > r_rejected)``, overall and per task when rows name one."""
    reward_model.eval()
    device = next(reward_model.parameters()).device
    wins = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = loading.collate_preferences([loading.encode_preference(tokenizer, r, max_length) for r in chunk],
                                            tokenizer.pad_token_id).to(device)
        r = reward_model(batch.input_ids, batch.attention_mask)
        wins += (r[:len(chunk)] > r[len(chunk):]).tolist()
    out = {"eval_accuracy": sum(wins) / len(wins)}
    for task in sorted({r.get("task") for r in rows if r.get("task")}):
        mine = [w for w, r in zip(wins, rows) if r.get("task") == task]
        out[f"{task}/reward_accuracy"] = sum(mine) / len(mine)
    reward_model.train()
    return out
