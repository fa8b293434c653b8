"""A frozen model (PPO's reward model) that takes no device memory between uses."""

from __future__ import annotations

import itertools

import torch


class OffloadedModel:
    """A frozen model that runs on ``device``; with ``offload`` it lives on the CPU and each call copies its
    weights to ``device`` for the forward (``torch.func.functional_call``) and drops the copies after, so
    between uses it takes no device memory. Frozen weights never change, so nothing is copied back."""

    def __init__(self, module, device, offload: bool):
        self.device, self.offload = torch.device(device), bool(offload)
        self.module = module.eval().requires_grad_(False).to("cpu" if self.offload else self.device)

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        if not self.offload:
            return self.module(*args, **kwargs)
        named = itertools.chain(self.module.named_parameters(), self.module.named_buffers())
        on_device = {name: t.to(self.device, non_blocking=True) for name, t in named}
        return torch.func.functional_call(self.module, on_device, args, kwargs)
