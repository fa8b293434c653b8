"""The ``cpu`` backend of steer_logits: ``torch.ops.fastalign.steer_logits`` (csrc/cpu/steering.cpp).

Inference only, so there is no autograd wrapper: the public op hands over detached inputs and the
result never requires grad. Row strides pass through to the kernel (``logits[:, -1, :]`` of a
``[B, T, V]`` output is read in place); a tensor whose columns are not contiguous is copied, and
float64 inputs are rounded to float32 (the op computes and returns float32 anyway).
"""

from __future__ import annotations

import torch

from .. import dispatch


def _register_fakes() -> None:
    @torch.library.register_fake("fastalign::steer_logits")
    def _(value_logits, base_logits, negative_logits, betas, alpha, temperature, top_p, min_tokens_to_keep):
        return value_logits.new_empty(value_logits.shape, dtype=torch.float32)


if dispatch._native_status()[0]:
    _register_fakes()


def _columns_contiguous(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float64:
        x = x.float()
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def steer_logits_native(value_logits, base_logits, negative_logits=None, *, alpha, betas, top_p, min_tokens_to_keep,
                        temperature):
    neg = None if negative_logits is None else _columns_contiguous(negative_logits)
    return torch.ops.fastalign.steer_logits(_columns_contiguous(value_logits), _columns_contiguous(base_logits), neg,
                                            betas.float().contiguous(), alpha, temperature, top_p,
                                            min_tokens_to_keep)


dispatch.register("steer_logits", "cpu")(steer_logits_native)
