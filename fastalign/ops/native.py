"""Compiled backends: autograd wrappers around the ``torch.ops.fastalign`` custom ops.

The kernels live in ``csrc/`` (C++/OpenMP for ``cpu``, CUDA for ``cuda``) and are registered by
``csrc/bindings.cpp`` with ``TORCH_LIBRARY(fastalign, ...)``. Fake (meta) implementations are
registered here so that ``torch.compile`` can trace through the ops without running them.
"""

from __future__ import annotations

import torch

from . import dispatch
from . import reference as ref

_SCALE_CODES = {"group": 0, "batch": 1, "none": 2}


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

    @register_fake("fastalign::group_advantages")
    def _(rewards, group_size, scale, eps):
        return torch.empty_like(rewards)

    @register_fake("fastalign::gae")
    def _(rewards, values, mask, gamma, lam):
        return torch.empty_like(rewards), torch.empty_like(rewards)


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


# ------------------------------------------------------------------ advantages (rarely differentiated)
class _Recomputed(torch.autograd.Function):
    """Native forward; backward via the reference's vector-Jacobian product (exact, rarely used)."""

    @staticmethod
    def forward(ctx, fn, reference_fn, kwargs, *inputs):
        ctx.reference_fn, ctx.kwargs = reference_fn, kwargs
        ctx.save_for_backward(*inputs)
        return fn(*inputs, **kwargs)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [x.detach().requires_grad_(x.dtype.is_floating_point) for x in ctx.saved_tensors]
        with torch.enable_grad():
            outs = ctx.reference_fn(*inputs, **ctx.kwargs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wrt = [x for x in inputs if x.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
        it = iter(got)
        return (None, None, None, *[next(it) if x.requires_grad else None for x in inputs])


def _group_advantages_kernel(rewards, *, group_size, scale, eps):
    return torch.ops.fastalign.group_advantages(rewards.float().contiguous(), group_size,
                                                _SCALE_CODES[scale], eps)


def group_advantages_native(rewards, group_size, *, scale, eps):
    out = _Recomputed.apply(_group_advantages_kernel,
                            lambda r, **kw: ref.group_advantages(r, kw["group_size"], scale=kw["scale"], eps=kw["eps"]),
                            {"group_size": group_size, "scale": scale, "eps": eps}, rewards)
    return out


def _gae_kernel(rewards, values, mask, *, gamma, lam):
    return torch.ops.fastalign.gae(rewards.float().contiguous(), values.float().contiguous(),
                                   (mask != 0).to(torch.float32).contiguous(), gamma, lam)


def _gae_reference(rewards, values, mask, *, gamma, lam):
    # Differentiable torch backend (vectorized time loop) stands in for the slow per-element spec.
    from .advantages import _gae_torch
    return _gae_torch(rewards, values, mask, gamma=gamma, lam=lam)


def gae_native(rewards, values, mask, *, gamma, lam):
    adv, ret = _Recomputed.apply(_gae_kernel, _gae_reference, {"gamma": gamma, "lam": lam},
                                 rewards, values, mask)
    return adv, ret


dispatch.register("logprobs_from_logits", "cpu")(logprobs_from_logits_native)
for _backend in ("cpu", "cuda"):  # the CUDA kernels cover the scans and segmented reductions
    dispatch.register("group_advantages", _backend)(group_advantages_native)
    dispatch.register("gae", _backend)(gae_native)
