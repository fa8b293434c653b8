"""What every Triton launcher here shares: the tensor's device as the launch device, and autotuning knobs.

Triton launches on the *current* CUDA device and stream, not on the device of the tensors it is
given; a caller whose current device is cuda:0 passing cuda:1 tensors would launch on the wrong
device (an illegal address, or silently wrong results). :func:`on_tensor_device` wraps each public
launcher in ``torch.cuda.device(<its first tensor's device>)``.

``FASTALIGN_AUTOTUNE=0`` makes every autotuned kernel run the first configuration of its list
that fits the device's shared memory (the known-good default, listed first on purpose) with no
benchmarking: one compile per kernel instead of one per config, as the GPU tests want.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch


def _first_cuda_tensor(args, kwargs):
    for x in (*args, *kwargs.values()):
        if isinstance(x, torch.Tensor) and x.is_cuda:
            return x
    return None


def on_tensor_device(fn):
    """Run ``fn`` with the current CUDA device set to that of its first CUDA tensor argument."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = _first_cuda_tensor(args, kwargs)
        guard = torch.cuda.device(t.device) if t is not None else contextlib.nullcontext()
        with guard:
            return fn(*args, **kwargs)

    return wrapper


def autotune_enabled() -> bool:
    return os.environ.get("FASTALIGN_AUTOTUNE", "1") != "0"


@functools.cache
def shared_memory_limit(device_index: int) -> int:
    """Bytes of shared memory one block may opt into on this CUDA device (227 KiB on H100/H200)."""
    props = torch.cuda.get_device_properties(device_index)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if not limit:
        from triton.runtime import driver
        limit = driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    return int(limit)


def prune_by_shared_memory(configs, smem_bytes, limit):
    """The configs whose estimated shared memory fits ``limit``, in their listed order.

    ``smem_bytes(config)`` estimates the pipelined operand tiles (stages x tile bytes), a lower
    bound of what Triton allocates: configs over it would only fail to launch after compiling.
    With ``FASTALIGN_AUTOTUNE=0`` only the first fitting config is returned. Never empty: when none
    fits, the smallest estimate is kept (and fails loudly if it really does not fit).
    """
    fitting = [c for c in configs if smem_bytes(c) <= limit]
    if not fitting:
        fitting = [min(configs, key=smem_bytes)]
    return fitting if autotune_enabled() else fitting[:1]
