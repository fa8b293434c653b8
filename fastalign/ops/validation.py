"""Input checks shared by the public ops.

Every failure names the argument, what was expected and what came. Checks on tensor *values*
(label ranges, empty masks) need a device sync; ``FASTALIGN_CHECK_VALUES=0`` skips them in hot
loops where the caller already guarantees them. Shape, dtype and device checks always run.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32)


def check_values_enabled() -> bool:
    return os.environ.get("FASTALIGN_CHECK_VALUES", "1") != "0"


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
    return tensor(name, x, dtypes=FLOAT_DTYPES, **kw)


def int_tensor(name: str, x, **kw) -> torch.Tensor:
    return tensor(name, x, dtypes=INT_DTYPES, **kw)


def mask_tensor(name: str, x, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask (bool, integer or floating) of ``shape``; returned as ``like``'s float dtype."""
    tensor(name, x)
    if x.dtype.is_complex:
        raise TypeError(f"{name} must be bool, integer or floating, got {x.dtype}")
    same_shape(name, x, shape)
    same_device(name, x, like)
    return x


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
