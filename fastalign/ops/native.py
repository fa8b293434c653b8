"""Compiled backends: autograd wrappers around the ``torch.ops.fastalign`` custom ops.

The kernels live in ``csrc/`` (C++/OpenMP for ``cpu``, CUDA for ``cuda``) and are registered by
``csrc/bindings.cpp`` with ``TORCH_LIBRARY(fastalign, ...)``. Fake (meta) implementations are
registered here so that ``torch.compile`` can trace through the ops without running them.
"""

from __future__ import annotations

import torch

from . import dispatch


def _load() -> bool:
    ok, _, _ = dispatch._native_status()
    return ok


def _register_fakes() -> None:
    register_fake = torch.library.register_fake

    @register_fake("fastalign::logprobs_fwd")
    def _(logits, labels, temperature, ignore_index):
        n = logits.shape[0]
        return (logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32),
                logits.new_empty(n, dtype=torch.float32))

    @register_fake("fastalign::logprobs_bwd")
    def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index):
        return torch.empty_like(logits)


if _load():
    _register_fakes()


# --------------------------------------------------------------------------- logprobs_from_logits
class _LogprobsFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, labels1d, temperature, ignore_index, inplace_backward):
        logp, entropy, lse = torch.ops.fastalign.logprobs_fwd(logits2d, labels1d, temperature, ignore_index)
        ctx.save_for_backward(logits2d, labels1d, lse, entropy)
        ctx.temperature, ctx.ignore_index, ctx.inplace = temperature, ignore_index, inplace_backward
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        logits2d, labels1d, lse, entropy = ctx.saved_tensors
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float().contiguous()
        grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
        if ctx.inplace:
            torch.ops.fastalign.logprobs_bwd_(logits2d, labels1d, lse, entropy, grad_logp, grad_entropy,
                                              ctx.temperature, ctx.ignore_index)
            grad = logits2d
        else:
            grad = torch.ops.fastalign.logprobs_bwd(logits2d, labels1d, lse, entropy, grad_logp, grad_entropy,
                                                    ctx.temperature, ctx.ignore_index)
        return grad, None, None, None, None


def logprobs_from_logits_native(logits, labels, *, temperature, ignore_index, return_entropy, inplace_backward):
    lead = logits.shape[:-1]
    logits2d = logits.reshape(-1, logits.shape[-1])
    if not logits2d.is_contiguous():
        logits2d = logits2d.contiguous()
    labels1d = labels.reshape(-1).to(torch.int64).contiguous()
    logp, entropy, _ = _LogprobsFromLogits.apply(logits2d, labels1d, temperature, ignore_index, inplace_backward)
    logp = logp.reshape(lead)
    return (logp, entropy.reshape(lead)) if return_entropy else logp


# The RL and preference ops (advantages, GAE, losses) live in native_rl.py.
dispatch.register("logprobs_from_logits", "cpu")(logprobs_from_logits_native)
