"""The ``triton`` backend of steer_logits (kernel: ``fastalign.triton_kernels.steering``).

Triton is imported only when this backend runs, so ``import fastalign`` works without it.
Inference only: no autograd wrapper, the result never requires grad. Row strides pass through to
the kernel; tensors whose columns are not contiguous are copied, float64 inputs rounded to float32.
"""

from __future__ import annotations

import torch

from .. import dispatch


def _kernel():
    from fastalign.triton_kernels import steering
    return steering


def _columns_contiguous(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float64:
        x = x.float()
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def steer_logits_triton(value_logits, base_logits, negative_logits=None, *, alpha, betas, top_p, min_tokens_to_keep,
                        temperature):
    neg = None if negative_logits is None else _columns_contiguous(negative_logits)
    return _kernel().steer_logits(_columns_contiguous(value_logits), _columns_contiguous(base_logits), neg,
                                  betas.float().contiguous(), alpha, temperature, top_p, min_tokens_to_keep)


dispatch.register("steer_logits", "triton")(steer_logits_triton)
