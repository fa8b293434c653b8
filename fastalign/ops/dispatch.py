"""Backend registry and selection for the public ops.

Each op registers one implementation per backend with :func:`register`. At call time
:func:`select` picks the fastest available backend for the tensor's device, unless a backend is
forced with ``FASTALIGN_BACKEND=...`` or ``with fastalign.ops.backend("..."):`` — a forced backend
that cannot run is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")

# Preference order when nothing is forced: native first, the torch reference last.
_PREFERENCE = {
    "cpu": ("cpu", "torch"),
    "cuda": ("triton", "cuda", "torch"),
}

_registry: dict[str, dict[str, Callable]] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastalign_backend", default=None)


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str

    def __repr__(self) -> str:  # compact in printed dicts
        return f"{'available' if self.available else 'unavailable'}: {self.reason}"


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``op``'s implementation on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn: Callable) -> Callable:
        _registry.setdefault(op, {})[backend] = fn
        return fn

    return deco


def implementations(op: str) -> dict[str, Callable]:
    return dict(_registry.get(op, {}))


def registered_ops() -> list[str]:
    """The public ops (names starting with ``_`` are internal pieces, like the chunk loops' row passes)."""
    return sorted(op for op in _registry if not op.startswith("_"))


@functools.cache
def _native_status() -> tuple[bool, bool, str]:
    """(cpu_available, cuda_built, reason) for the compiled extension fastalign._C."""
    try:
        from fastalign import _C  # importing registers the torch.ops.fastalign ops
    except ImportError as exc:
        return False, False, (
            f"fastalign._C is not built ({exc}); reinstall with a C++17 compiler: "
            "pip install --no-build-isolation -e ."
        )
    return True, bool(_C.cuda_built()), "fastalign._C loaded"


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_status() -> BackendStatus:
    try:
        import triton  # noqa: F401
    except ImportError:
        return BackendStatus(False, "triton is not installed (pip install 'fastalign[dev]' or triton>=3.0)")
    if torch.cuda.is_available():
        return BackendStatus(True, f"triton {triton.__version__} on CUDA")
    if _triton_interpreting():
        return BackendStatus(True, f"triton {triton.__version__} in the interpreter (TRITON_INTERPRET=1, CPU tensors)")
    return BackendStatus(False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the CPU interpreter)")


def backends() -> dict[str, BackendStatus]:
    """What is available on this machine, and why not."""
    cpu_ok, cuda_built, reason = _native_status()
    if not cpu_ok:
        cuda = BackendStatus(False, reason)
    elif not cuda_built:
        cuda = BackendStatus(False, "fastalign._C was built without CUDA (torch without CUDA or no nvcc at build time)")
    elif not torch.cuda.is_available():
        cuda = BackendStatus(False, "fastalign._C has CUDA kernels but no CUDA device is visible")
    else:
        cuda = BackendStatus(True, "fastalign._C CUDA kernels")
    return {
        "torch": BackendStatus(True, f"pure PyTorch {torch.__version__} (the reference; any device)"),
        "cpu": BackendStatus(cpu_ok, "native C++/OpenMP kernels" if cpu_ok else reason),
        "triton": _triton_status(),
        "cuda": cuda,
    }


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force every op called inside the block onto backend ``name``."""
    _check_name(name, "backend")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    name = _forced.get()
    if name is None:
        env = os.environ.get("FASTALIGN_BACKEND", "").strip()
        name = _check_name(env, "FASTALIGN_BACKEND") if env else None
    return name


def _device_ok(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and _triton_interpreting())
    return device.type == "cuda"


def select(op: str, device: torch.device) -> tuple[str, Callable]:
    """Return ``(backend_name, implementation)`` for ``op`` on tensors living on ``device``."""
    impls = _registry.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    name = forced_backend()
    if name is not None:
        status = backends()[name]
        if not status.available:
            raise RuntimeError(f"backend {name!r} was forced for {op} but is unavailable: {status.reason}")
        if name not in impls:
            raise NotImplementedError(
                f"op {op} has no {name!r} backend (it has: {', '.join(sorted(impls))})"
            )
        if not _device_ok(name, device):
            raise RuntimeError(f"backend {name!r} was forced for {op} but the inputs are on {device}")
        return name, impls[name]
    status = backends()
    for cand in _PREFERENCE.get(device.type, ("torch",)):
        if cand in impls and status[cand].available and _device_ok(cand, device):
            return cand, impls[cand]
    return "torch", impls["torch"]
