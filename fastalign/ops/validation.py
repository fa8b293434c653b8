"""Input checks shared by the public ops.

Every failure names the argument, what was expected and what came. Checks on tensor *values*
need a device sync; ``FASTALIGN_CHECK_VALUES`` chooses them (shape, dtype and device checks always run):

* ``1`` (default): labels in ``[0, V)`` or ``ignore_index``; masks hold only 0 and 1; no empty rows
  where a mean needs one. NaN/Inf in float inputs is not checked: it comes out as NaN (the flows
  stop on a non-finite loss or gradient, naming the step).
* ``2``: also every float input must be finite (NaN/Inf raise, naming the argument and an index).
* ``0``: none, for hot loops where the caller guarantees them. Bad values may then give wrong
  results, but never an out-of-bounds read: an out-of-range label gives a NaN log-prob for its
  position and no gradient from it, on every backend.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32)


def check_values_level() -> int:
    """0, 1 or 2 from ``FASTALIGN_CHECK_VALUES`` (default 1)."""
    raw = os.environ.get("FASTALIGN_CHECK_VALUES", "1").strip() or "1"
    if raw not in ("0", "1", "2"):
        raise ValueError(f"FASTALIGN_CHECK_VALUES must be 0 (no value checks), 1 (default) or 2 (also finiteness), "
                         f"got {raw!r}")
    return int(raw)


def check_values_enabled() -> bool:
    return check_values_level() >= 1


def _first_index(bad: torch.Tensor) -> tuple:
    return tuple(int(i) for i in bad.nonzero()[0].tolist())


def tensor(name: str, x, *, dtypes: Sequence[torch.dtype] | None = None, dim: int | None = None,
           min_dim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(x.shape)}")
    if min_dim is not None and x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    return x


def float_tensor(name: str, x, **kw) -> torch.Tensor:
    tensor(name, x, dtypes=FLOAT_DTYPES, **kw)
    if x.numel() and check_values_level() >= 2:
        bad = ~torch.isfinite(x.detach())
        if bool(bad.any()):
            where = _first_index(bad)
            raise ValueError(f"{name} must be finite (FASTALIGN_CHECK_VALUES=2), got {x[where].item()} at index "
                             f"{where} ({int(bad.sum())} non-finite value(s))")
    return x


def int_tensor(name: str, x, **kw) -> torch.Tensor:
    return tensor(name, x, dtypes=INT_DTYPES, **kw)


def mask_tensor(name: str, x, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask (bool, integer or floating) of ``shape``; returned as ``like``'s float dtype."""
    tensor(name, x)
    if x.dtype.is_complex:
        raise TypeError(f"{name} must be bool, integer or floating, got {x.dtype}")
    same_shape(name, x, shape)
    same_device(name, x, like)
    if x.dtype != torch.bool and x.numel() and check_values_enabled():
        # A weight of 2 or NaN would silently count a position twice or poison the sum: only 0/1 selects.
        where = _first_non_binary(x)
        if where is not None:
            raise ValueError(f"{name} must hold only 0 and 1 (a bool mask, or 0/1 integers or floats), got "
                             f"{x[where].item()} at index {where}")
    return x


_NATIVE_MASK_DTYPES = (torch.float32, torch.float64, torch.int64, torch.int32)


def _first_non_binary(x: torch.Tensor) -> tuple | None:
    """The index of the first value that is neither 0 nor 1, or None: one native read of a CPU mask (the
    check must not cost more than the ops it guards), else torch."""
    if (x.device.type == "cpu" and x.dtype in _NATIVE_MASK_DTYPES and x.is_contiguous()
            and not torch.compiler.is_compiling()):
        from . import native

        if native.has_op("first_non_binary"):
            flat = torch.ops.fastalign.first_non_binary(x)
            return None if flat < 0 else tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), x.shape))
    bad = (x != 0) & (x != 1)
    return _first_index(bad) if bool(bad.any()) else None


def same_shape(name: str, x: torch.Tensor, shape: Iterable[int], ref: str | None = None) -> None:
    shape = tuple(shape)
    if tuple(x.shape) != shape:
        where = f" (the shape of {ref})" if ref else ""
        raise ValueError(f"{name} must have shape {shape}{where}, got {tuple(x.shape)}")


def same_device(name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str = "the first input") -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like {ref_name}, got {x.device}")


def choice(name: str, value, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}, got {value!r}")
    return value


def positive(name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if value != value or (value < 0 if allow_zero else value <= 0) or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return float(value)


def in_range(name: str, value, low: float, high: float, *, high_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")
    return float(value)


def integer(name: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    if not check_values_enabled() or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(
            f"labels must be in [0, {vocab}) or ignore_index={ignore_index}, got {first} "
            f"({int(bad.sum())} position(s) out of range)"
        )


def nonempty_rows(name: str, mask: torch.Tensor) -> None:
    if not check_values_enabled() or mask.numel() == 0:
        return
    empty = (mask != 0).sum(-1) == 0
    if bool(empty.any()):
        rows = empty.nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} must select at least one position per row, got empty rows {rows}")
