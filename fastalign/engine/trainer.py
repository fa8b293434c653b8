"""The loop every flow shares: batches → micro-batches → backward → clip → step → log → checkpoint.

A flow supplies ``loss_fn(model, batch) -> (loss_sum, metric_sums)`` and ``weight_fn(batch)``:
the loss and every metric are *sums* over the batch's units (target tokens for SFT, pairs for
preference losses) and the trainer divides by the global number of units, all-reduced over
processes and summed over micro-batches. That makes gradient accumulation and any world size
give the same gradient as one process over the whole global batch. A non-finite loss or gradient
stops the run with :class:`TrainingDiverged`, naming the step; no checkpoint is written after it,
so the last good one survives.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint as ckpt
from .distributed import DistState, all_reduce_sum, no_sync, unwrap
from .logging import RunLogger
from .runs import commit_run


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/Inf; the message names the step and the last good checkpoint."""


class BatchStream:
    """Deterministic global batches: a seeded permutation per epoch, this process's contiguous slice,
    split into micro-batches. ``state_dict`` is the data position a checkpoint stores."""

    def __init__(self, examples, collate_fn, *, batch_size, micro_batch_size=0, state: DistState, seed=0):
        if batch_size % state.world_size:
            raise ValueError(f"batch_size must be divisible by the world size {state.world_size}, got {batch_size}")
        per_rank = batch_size // state.world_size
        micro = micro_batch_size or per_rank
        if per_rank % micro:
            raise ValueError(f"micro_batch_size must divide batch_size / world size = {per_rank}, got {micro}")
        if len(examples) < batch_size:
            raise ValueError(f"batch_size ({batch_size}) is larger than the dataset ({len(examples)} rows)")
        self.examples, self.collate_fn = examples, collate_fn
        self.batch_size, self.per_rank, self.micro = batch_size, per_rank, micro
        self.rank, self.seed = state.rank, seed
        self.epoch, self.position = 0, 0
        self._order = None

    def _epoch_order(self):
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(len(self.examples), generator=g).tolist()
        return self._order

    def next(self) -> list:
        if self.position + self.batch_size > len(self.examples):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        order = self._epoch_order()
        batch = order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        mine = batch[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        if self.micro < self.per_rank:
            # Micro-batches of similar lengths pad less; the step's gradient (a sum over them) is unchanged.
            mine = sorted(mine, key=self._length)
        return [self.collate_fn([self.examples[i] for i in mine[j:j + self.micro]], mine[j:j + self.micro])
                for j in range(0, len(mine), self.micro)]

    def _length(self, i):
        ex = self.examples[i]
        if isinstance(ex, dict) and "input_ids" in ex:
            return len(ex["input_ids"])
        if isinstance(ex, dict) and "chosen" in ex:
            return max(len(ex["chosen"]["input_ids"]), len(ex["rejected"]["input_ids"]))
        return 0

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, s):
        self.epoch, self.position, self._order = s["epoch"], s["position"], None


@dataclass
class TrainResult:
    step: int
    history: list = field(default_factory=list)
    checkpoint: Path | None = None


def _num_tokens(batch) -> int:
    mask = getattr(batch, "attention_mask", None)
    return int(mask.sum()) if mask is not None else int(batch.input_ids.numel())


def _grad_norm(params, max_norm):
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))


def accumulate_gradients(model, micro_batches, loss_fn, weight_fn, state: DistState):
    """Backward over this process's micro-batches so the gradients equal those of the global mean loss.

    Returns the global metrics (sums divided by the global unit count) and this process's token count.
    """
    units = all_reduce_sum(float(sum(weight_fn(b) for b in micro_batches)), state)
    if units <= 0:
        raise ValueError("the global batch has no loss units (no target tokens or pairs)")
    sums: dict = {}
    tokens = 0
    for i, batch in enumerate(micro_batches):
        batch = batch.to(state.device)
        with no_sync(model, skip=i < len(micro_batches) - 1):
            loss_sum, metric_sums = loss_fn(model, batch)
            # DDP/FSDP average gradients over processes; × world size turns that into the global sum.
            (loss_sum * (state.world_size / units)).backward()
        sums["loss"] = sums.get("loss", 0.0) + loss_sum.detach().double()
        for k, v in metric_sums.items():
            sums[k] = sums.get(k, 0.0) + torch.as_tensor(v).detach().double()
        tokens += _num_tokens(batch)
    keys = sorted(sums)
    totals = all_reduce_sum(torch.stack([torch.as_tensor(sums[k]).cpu() for k in keys]), state)
    return {k: float(v) / units for k, v in zip(keys, totals)}, tokens


def train(*, cfg, run_dir, model, optimizer, scheduler, stream: BatchStream, loss_fn: Callable,
          weight_fn: Callable, state: DistState, desc="train", on_step: Callable | None = None) -> TrainResult:
    """Run ``cfg.max_steps`` optimizer steps (continuing from the latest checkpoint when ``cfg.resume``)."""
    run_dir = Path(run_dir)
    start_step, history, last_ckpt = 0, [], None
    if cfg.resume:
        last_ckpt = ckpt.latest_checkpoint(run_dir)
        if last_ckpt is not None:
            saved = ckpt.load_checkpoint(last_ckpt, model, optimizer, state)
            start_step, history = saved["step"], saved.get("history", [])
            scheduler.load_state_dict(saved["scheduler"])
            stream.load_state_dict(saved["data"])
            if state.is_main:
                print(f"resumed from {last_ckpt} at step {start_step}")
    # Setup (and the checkpoint's load) succeeded: only now is the run folder written, config.yaml first.
    commit_run(run_dir)
    logger = RunLogger(run_dir, total_steps=cfg.max_steps, start_step=start_step, enabled=state.is_main,
                       progress=cfg.progress, tensorboard=cfg.tensorboard, desc=desc)
    params = [p for p in unwrap(model).parameters() if p.requires_grad]
    model.train()

    def save(step):
        trainer_state = {"step": step, "scheduler": scheduler.state_dict(), "data": stream.state_dict(),
                         "history": history}
        return ckpt.save_checkpoint(run_dir, step, model, optimizer, trainer_state, state, keep=cfg.keep_checkpoints)

    step = start_step
    window_t, window_tokens = time.time(), 0
    while step < cfg.max_steps:
        try:
            metrics, tokens = accumulate_gradients(model, stream.next(), loss_fn, weight_fn, state)
        except ValueError as e:
            raise ValueError(f"step {step + 1}: {e}") from None
        window_tokens += tokens
        grad_norm = float(_grad_norm(params, cfg.max_grad_norm))
        if not math.isfinite(metrics["loss"]) or not math.isfinite(grad_norm):
            what = "loss" if not math.isfinite(metrics["loss"]) else "gradient norm"
            value = metrics["loss"] if what == "loss" else grad_norm
            logger.close(plot=False)
            kept = ckpt.latest_checkpoint(run_dir)
            raise TrainingDiverged(f"{what} became {value} at step {step + 1}; training stopped. "
                                   f"Last good checkpoint: {kept if kept else 'none was written'}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        metrics.update(grad_norm=grad_norm, lr=scheduler.get_last_lr()[0])
        if on_step is not None:
            metrics.update(on_step(step) or {})
        history.append({"step": step, "loss": metrics["loss"]})
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            elapsed = time.time() - window_t
            tokens = all_reduce_sum(float(window_tokens), state)
            metrics["tokens_per_s"] = tokens / max(elapsed, 1e-9)
            window_t, window_tokens = time.time(), 0
            logger.log(step, metrics)
        else:
            logger.advance()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            last_ckpt = save(step)
    last_ckpt = save(step) if step > start_step or last_ckpt is None else last_ckpt
    logger.close()
    return TrainResult(step=step, history=history, checkpoint=last_ckpt)
