"""The ``cpu`` backend of kl_penalty: ``torch.ops.fastalign.kl_fwd`` / ``kl_bwd`` (csrc/cpu/rl_ops.cpp)."""

from __future__ import annotations

import torch

from .. import native
from ..native import f32 as _f32
from ..native import grad as _grad
from .spec import KlKind


class _KlPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref_logp, kind):
        ctx.save_for_backward(logp, ref_logp)
        ctx.kind = kind
        return torch.ops.fastalign.kl_fwd(logp, ref_logp, kind)

    @staticmethod
    def backward(ctx, grad):
        logp, ref_logp = ctx.saved_tensors
        return torch.ops.fastalign.kl_bwd(_grad(grad), logp, ref_logp, ctx.kind), None, None


def kl_penalty_native(logp, ref_logp, *, kind):
    return _KlPenalty.apply(_f32(logp), _f32(ref_logp.detach()), KlKind.code(kind))


if native.has_op("kl_fwd"):
    torch.library.register_fake("fastalign::kl_fwd")(lambda logp, ref_logp, kind: torch.empty_like(logp))
    torch.library.register_fake("fastalign::kl_bwd")(lambda grad, logp, ref_logp, kind: torch.empty_like(logp))
    native.register("kl_penalty", kl_penalty_native)
