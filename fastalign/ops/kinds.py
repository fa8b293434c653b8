"""Kind lists (KL estimators, loss types, advantage scales…) declared once, as ``IntEnum``s.

Each op's spec declares its kinds with :class:`Kind`; the integer values are the codes the native
(``csrc/``) and Triton (``triton_kernels/``) kernels switch on. The Triton launchers import these
enums directly; the C++ enums are checked against them by ``tests/test_kinds.py``, and every kernel
rejects a code it does not know instead of computing some other kind.
"""

from __future__ import annotations

import enum


class Kind(enum.IntEnum):
    """An enum of named choices whose values are the kernels' codes."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(k.name for k in cls)

    @classmethod
    def code(cls, name: str, arg: str = "kind") -> int:
        """The kernel code of ``name``; a ValueError naming ``arg`` for anything else."""
        if isinstance(name, cls):
            return int(name)
        try:
            return int(cls[name])
        except (KeyError, TypeError):
            raise ValueError(f"{arg} must be one of {', '.join(cls.names())}, got {name!r}") from None
