"""AdamW with linear warmup then cosine decay to ``min_lr_ratio · lr``."""

from __future__ import annotations

import math

import torch


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (check lora_r / trainable_top_layers)")
    # Decay matrices only: norms and biases keep their scale (the usual transformer recipe).
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps)


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at ``step`` (0-based: the lr used by the step-th optimizer update)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(max_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose checkpointed state is its position only: on resume the lr comes from this run's config
    (``lr``, ``max_steps``, ``warmup_steps``, ``min_lr_ratio``) at the saved step, not from the checkpoint's.
    With an unchanged config that is exactly the lr the checkpoint held (same formula, same inputs)."""

    def load_state_dict(self, state_dict):
        self.last_epoch = state_dict["last_epoch"]
        self._step_count = state_dict.get("_step_count", self.last_epoch + 1)
        lrs = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
        for group, base, lr in zip(self.optimizer.param_groups, self.base_lrs, lrs):
            group["initial_lr"], group["lr"] = base, lr
        self._last_lr = lrs


def build_scheduler(optimizer, cfg):
    return WarmupCosine(optimizer, lambda step: lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
