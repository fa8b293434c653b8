"""Triton GPU kernels, installed as ``fastalign.triton_kernels``.

Importing this package needs ``triton``; ``fastalign.ops`` imports it lazily, only when the
``triton`` backend runs. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors in
Triton's interpreter (used by the tests at small sizes).
"""
