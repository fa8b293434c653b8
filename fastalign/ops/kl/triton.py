"""The ``triton`` backend of kl_penalty (``fastalign.triton_kernels.rl_losses``; triton loads on first call)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import dispatch


def _kernels():
    from fastalign.triton_kernels import rl_losses

    return rl_losses


class _KlPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref_logp, kind):
        k = _kernels()
        logp_c, ref_c = logp.contiguous(), ref_logp.contiguous()
        ctx.save_for_backward(logp_c, ref_c)
        ctx.kind = kind
        return k.kl_penalty_forward(logp_c, ref_c, kind)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        logp_c, ref_c = ctx.saved_tensors
        return _kernels().kl_penalty_backward(grad, logp_c, ref_c, ctx.kind), None, None


@dispatch.register("kl_penalty", "triton")
def kl_penalty_triton(logp, ref_logp, *, kind):
    return _KlPenalty.apply(logp, ref_logp, kind)
