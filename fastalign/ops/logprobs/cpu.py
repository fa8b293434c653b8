"""The ``cpu`` backends of the log-prob ops (csrc/cpu/logprobs.cpp, csrc/common/logprobs_row.h).

The fused row passes ``logprobs_fwd`` / ``logprobs_bwd_`` (one vectorized pass per row and
direction) serve logprobs_from_logits directly and, as the ``_logprob_rows`` of the chunk loops,
token_logprobs and every fused loss on CPU. sequence_logprobs is a segmented sum (also on CUDA).
"""

from __future__ import annotations

import torch

from .. import native
from ..native import f32 as _f32
from ..native import grad as _grad
from ..native import weights as _weights
from . import chunked


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



class _SequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token_logp, mask, average):
        ctx.save_for_backward(mask)
        ctx.average = average
        return torch.ops.fastalign.sequence_logprobs_fwd(token_logp, mask, average)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return torch.ops.fastalign.sequence_logprobs_bwd(_grad(grad), mask, ctx.average), None, None


def sequence_logprobs_native(token_logp, mask, *, average):
    return _SequenceLogprobs.apply(_f32(token_logp), _weights(mask), average)


def _rows_forward_native(z, labels, temperature, ignore_index):
    return torch.ops.fastalign.logprobs_fwd(z, labels, temperature, ignore_index)


def _rows_backward_native_(z, labels, rel_lse, entropy, g_logp, g_entropy, temperature, ignore_index):
    torch.ops.fastalign.logprobs_bwd_(z, labels, rel_lse, entropy, g_logp, g_entropy, temperature, ignore_index)


CPU_ROWS = chunked.LogprobRows("cpu", _rows_forward_native, _rows_backward_native_)


def token_logprobs_native(hidden, weight, labels, **kw):
    return chunked.token_logprobs_chunked(hidden, weight, labels, rows=CPU_ROWS, **kw)


if native.has_op("logprobs_fwd"):
    _register_fakes()
    torch.library.register_fake("fastalign::sequence_logprobs_fwd")(
        lambda logp, mask, average: logp.new_empty(logp.shape[0]))
    torch.library.register_fake("fastalign::sequence_logprobs_bwd")(
        lambda grad, mask, average: torch.empty_like(mask))
    native.register("_logprob_rows", CPU_ROWS)
    native.register("token_logprobs", token_logprobs_native)
    native.register("logprobs_from_logits", logprobs_from_logits_native)
    native.register("sequence_logprobs", sequence_logprobs_native, cuda=True)
