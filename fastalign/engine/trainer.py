"""The loop every flow shares: batches → micro-batches → backward → clip → step → log → checkpoint.

:class:`Trainer` owns what is the same for every flow (resume, the step loop, the NaN/Inf stop, logging,
checkpoints); :func:`train` is its one-optimizer-update-per-step form. For :func:`train` a flow supplies
``loss_fn(model, batch) -> (loss_sum, metric_sums)`` and ``weight_fn(batch)``: the loss and every metric are
*sums* over the batch's units (target tokens for SFT, pairs for preference losses) and the trainer divides by
the global number of units, all-reduced over processes and summed over micro-batches. That makes gradient
accumulation and any world size give the same gradient as one process over the whole global batch. A
non-finite loss or gradient stops the run with :class:`TrainingDiverged`, naming the step; no checkpoint is
written after it, so the last good one survives.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fastalign.models.packed import forwarded_positions

from . import checkpoint as ckpt
from .batching import process_microbatches
from .distributed import DistState, all_gather_object, all_reduce_sum, no_sync, unwrap
from .logging import RunLogger
from .runs import commit_run


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/Inf; the message names the step and the last good checkpoint."""


class BatchStream:
    """Deterministic global batches: a seeded permutation per epoch, this process's contiguous slice,
    split into micro-batches (``micro_batch_size`` rows each, or up to ``max_tokens_per_microbatch`` forwarded
    tokens each: :mod:`fastalign.engine.batching`; ``packed`` says the forward runs no padding). ``state_dict`` is
    the data position a checkpoint stores."""

    def __init__(self, examples, collate_fn, *, batch_size, micro_batch_size=0, state: DistState, seed=0,
                 max_tokens_per_microbatch=0, packed=False):
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
        self.rank, self.seed, self.state = state.rank, seed, state
        self.max_tokens, self.packed = max_tokens_per_microbatch, packed
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
        if self.max_tokens:
            groups = process_microbatches([self._sequence_lengths(i) for i in mine], self.max_tokens,
                                          packed=self.packed, state=self.state)
            return [self.collate_fn([self.examples[mine[j]] for j in g], [mine[j] for j in g]) for g in groups]
        if self.micro < self.per_rank:
            # Micro-batches of similar lengths pad less; the step's gradient (a sum over them) is unchanged.
            mine = sorted(mine, key=self._length)
        return [self.collate_fn([self.examples[i] for i in mine[j:j + self.micro]], mine[j:j + self.micro])
                for j in range(0, len(mine), self.micro)]

    def _sequence_lengths(self, i) -> list[int]:
        """The lengths of the sequences dataset row ``i`` forwards (one for SFT, chosen and rejected for a pair)."""
        ex = self.examples[i]
        if isinstance(ex, dict) and "input_ids" in ex:
            return [len(ex["input_ids"])]
        if isinstance(ex, dict) and "chosen" in ex:
            return [len(ex["chosen"]["input_ids"]), len(ex["rejected"]["input_ids"])]
        raise ValueError(f"max_tokens_per_microbatch needs encoded rows (input_ids, or chosen and rejected), got row "
                         f"{i} with keys {sorted(ex) if isinstance(ex, dict) else type(ex).__name__}")

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


def accumulate_gradients(model, micro_batches, loss_fn, weight_fn, state: DistState,
                         packed_attention: str | None = None):
    """Backward over this process's micro-batches so the gradients equal those of the global mean loss.

    Returns the global metrics (sums divided by the global unit count, plus, when the model's forward is packed —
    ``packed_attention`` names its attention implementation — ``padding_removed``: the global share of the padded
    batches' positions the packed forward did not run) and this process's token count.
    """
    units = all_reduce_sum(float(sum(weight_fn(b) for b in micro_batches)), state)
    if units <= 0:
        raise ValueError("the global batch has no loss units (no target tokens or pairs)")
    sums: dict = {}
    tokens = padded_positions = forwarded = 0
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
        padded_positions += batch.input_ids.numel()
        if packed_attention:  # rows packed by the collate function already have no mask
            forwarded += (forwarded_positions(batch.attention_mask, packed_attention)
                          if batch.attention_mask is not None else batch.input_ids.numel())
    keys = sorted(sums)
    totals = all_reduce_sum(torch.stack([torch.as_tensor(sums[k]).cpu() for k in keys]
                                        + [torch.tensor(float(forwarded), dtype=torch.float64),
                                           torch.tensor(float(padded_positions), dtype=torch.float64)]), state)
    metrics = {k: float(v) / units for k, v in zip(keys, totals)}
    if packed_attention:
        metrics["padding_removed"] = 1.0 - float(totals[-2]) / max(float(totals[-1]), 1.0)
    return metrics, tokens


class Trainer:
    """What every training flow shares around its steps: resume, the step loop, the NaN/Inf stop, logging and
    checkpoints.

    A step is what a flow's ``step_fn(step) -> (metrics, tokens)`` does between two learning-rate updates: one
    optimizer update over the stream's micro-batches for SFT, reward, DPO, SimPO and GRPO (:func:`train`); a
    rollout and its PPO epochs of minibatch updates for PPO. The step function changes the weights only through
    :meth:`optimizer_step`, which clips the gradient and stops the run on a non-finite loss or gradient. A
    checkpoint holds ``model`` (one module: everything training changes), the optimizer, the step, the schedule,
    ``stream.state_dict()``, the history (``history_keys`` of every step's metrics) and each ``extra_state``
    entry (a ``torch.Generator`` or an object with ``state_dict``/``load_state_dict``, e.g. PPO's KL controller).
    """

    def __init__(self, *, cfg, run_dir, model, optimizer, scheduler, stream, state: DistState, desc="train",
                 extra_state: dict | None = None, history_keys=("loss",)):
        self.cfg, self.run_dir, self.state, self.desc = cfg, Path(run_dir), state, desc
        self.model, self.optimizer, self.scheduler, self.stream = model, optimizer, scheduler, stream
        self.extra_state, self.history_keys = dict(extra_state or {}), tuple(history_keys)
        self.params = [p for p in unwrap(model).parameters() if p.requires_grad]
        self.step, self.history, self.checkpoint = 0, [], None
        self.logger: RunLogger | None = None

    # --- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        out = {"step": self.step, "scheduler": self.scheduler.state_dict(), "data": self.stream.state_dict(),
               "history": self.history}
        for name, obj in self.extra_state.items():
            out[name] = obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()
        if self.state.distributed:
            # The stream and the extra states can differ per process (each samples with its own RNG; GRPO's pending
            # rollout is its own share): every process's copy is kept, so a resume at the same world size continues
            # each one exactly. The top-level copies are the main process's.
            out["per_process"] = all_gather_object({k: out[k] for k in ("data", *self.extra_state)}, self.state)
        return out

    def load_state_dict(self, saved: dict):
        """Restore the state of :meth:`state_dict`. At the world size that saved it each process takes its own
        stream and extra states; at another world size every process takes the main process's."""
        own = saved.get("per_process")
        if own is not None and len(own) == self.state.world_size:
            saved = {**saved, **own[self.state.rank]}
        self.step, self.history = saved["step"], saved.get("history", [])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.stream.load_state_dict(saved["data"])
        for name, obj in self.extra_state.items():
            obj.set_state(saved[name]) if isinstance(obj, torch.Generator) else obj.load_state_dict(saved[name])

    def save(self) -> Path:
        self.checkpoint = ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.state_dict(),
                                               self.state, keep=self.cfg.keep_checkpoints)
        return self.checkpoint

    def resume(self):
        """Continue from the run folder's latest checkpoint, if it has one."""
        last = ckpt.latest_checkpoint(self.run_dir)
        if last is None:
            return
        self.load_state_dict(ckpt.load_checkpoint(last, self.model, self.optimizer, self.state))
        self.checkpoint = last
        if self.state.is_main:
            print(f"resumed from {last} at step {self.step}")

    # --- one optimizer update ------------------------------------------------------------------------
    def optimizer_step(self, loss: float, detail: str = "") -> float:
        """Clip the gradients, step the optimizer and clear the gradients; returns the norm before clipping.

        A non-finite ``loss`` or gradient norm raises :class:`TrainingDiverged` instead, naming the step (and
        ``detail``, e.g. which update of the step) and the last good checkpoint, which no later one replaces."""
        grad_norm = float(_grad_norm(self.params, self.cfg.max_grad_norm))
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
            if self.logger is not None:
                self.logger.close(plot=False)
            kept = ckpt.latest_checkpoint(self.run_dir)
            raise TrainingDiverged(f"{what} became {value} at step {self.step + 1}{detail}; training stopped. "
                                   f"Last good checkpoint: {kept if kept else 'none was written'}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # --- the loop --------------------------------------------------------------------------------------
    def fit(self, step_fn: Callable, on_step: Callable | None = None) -> TrainResult:
        """Run steps up to ``cfg.max_steps`` (from the latest checkpoint when ``cfg.resume``): each step
        ``step_fn(step)``, then the learning-rate schedule, ``on_step(step)`` (its metrics join the step's), the
        log line and, every ``cfg.save_every`` steps and at the end, a checkpoint."""
        cfg = self.cfg
        if cfg.resume:
            self.resume()
        # Setup (and the checkpoint's load) succeeded: only now is the run folder written, config.yaml first.
        commit_run(self.run_dir)
        start_step = self.step
        self.logger = RunLogger(self.run_dir, total_steps=cfg.max_steps, start_step=start_step,
                                enabled=self.state.is_main, progress=cfg.progress, tensorboard=cfg.tensorboard,
                                desc=self.desc)
        self.model.train()
        window_t, window_tokens = time.time(), 0
        while self.step < cfg.max_steps:
            metrics, tokens = step_fn(self.step + 1)
            window_tokens += tokens
            self.scheduler.step()
            self.step += 1
            metrics["lr"] = self.scheduler.get_last_lr()[0]
            if on_step is not None:
                metrics.update(on_step(self.step) or {})
            self.history.append({"step": self.step, **{k: metrics[k] for k in self.history_keys if k in metrics}})
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                elapsed = time.time() - window_t
                metrics["tokens_per_s"] = all_reduce_sum(float(window_tokens), self.state) / max(elapsed, 1e-9)
                window_t, window_tokens = time.time(), 0
                self.logger.log(self.step, metrics)
            else:
                self.logger.advance()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save()
        if self.step > start_step or self.checkpoint is None:
            self.save()
        self.logger.close()
        return TrainResult(step=self.step, history=self.history, checkpoint=self.checkpoint)


def train(*, cfg, run_dir, model, optimizer, scheduler, stream: BatchStream, loss_fn: Callable,
          weight_fn: Callable, state: DistState, desc="train", on_step: Callable | None = None) -> TrainResult:
    """Run ``cfg.max_steps`` optimizer steps, each over the micro-batches of ``stream.next()`` (continuing from
    the latest checkpoint when ``cfg.resume``); see the module docstring for ``loss_fn`` and ``weight_fn``."""
    trainer = Trainer(cfg=cfg, run_dir=run_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                      stream=stream, state=state, desc=desc)

    packed_attention = cfg.attn_implementation if getattr(cfg, "packed", False) else None

    def step_fn(step):
        try:
            micro_batches = stream.next()
            metrics, tokens = accumulate_gradients(model, micro_batches, loss_fn, weight_fn, state,
                                                   packed_attention=packed_attention)
        except ValueError as e:
            raise ValueError(f"step {step}: {e}") from None
        metrics["grad_norm"] = trainer.optimizer_step(metrics["loss"])
        metrics["forwards"] = int(all_reduce_sum(float(len(micro_batches)), state))  # over all processes
        return metrics, tokens

    return trainer.fit(step_fn, on_step=on_step)
