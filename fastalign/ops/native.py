"""What every compiled-backend launcher shares: whether ``fastalign._C`` loaded, and its casts.

The kernels live in ``csrc/`` (C++/OpenMP for ``cpu``, CUDA for ``cuda``) and are registered by
``csrc/bindings.cpp`` with ``TORCH_LIBRARY(fastalign, ...)``; each op's ``cpu.py`` wraps them in an
``autograd.Function`` and registers fake (meta) implementations so ``torch.compile`` can trace them.
The RL kernels take float32: their inputs are ``[B, T]`` or ``[B]`` (never ``N x V``), so bf16/fp16
inputs are upcast with a differentiable ``.float()`` and autograd casts the gradients back.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import dispatch


def loaded() -> bool:
    """fastalign._C imported (importing it registers the ``torch.ops.fastalign`` ops)."""
    return dispatch._native_status()[0]


def has_op(name: str) -> bool:
    return loaded() and hasattr(torch.ops.fastalign, name)


def f32(x: torch.Tensor) -> torch.Tensor:
    return x.float().contiguous()


def weights(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask as the float32 weights the kernels multiply by."""
    return mask.to(torch.float32).contiguous()


def grad(g: torch.Tensor | None) -> torch.Tensor | None:
    return None if g is None else g.float().contiguous()


def register(op: str, impl: Callable, *, cuda: bool = False) -> None:
    """Register ``impl`` as ``op``'s ``cpu`` backend (and ``cuda`` when ``_C`` has CUDA kernels for it)."""
    dispatch.register(op, "cpu")(impl)
    if cuda and dispatch._native_status()[1]:
        dispatch.register(op, "cuda")(impl)
