"""fastalign: fast, memory-lean kernels and flows for aligning language models."""

__version__ = "0.1.0"

from . import ops  # noqa: E402

__all__ = ["ops", "__version__"]
