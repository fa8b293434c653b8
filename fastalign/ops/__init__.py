"""fastalign.ops — the public fused ops, organized by op.

Each op family is a package (``logprobs``, ``kl``, ``advantages``, ``policy``, ``offpolicy``,
``preference``, ``steering``) holding its public functions with their validation, its kinds declared once
(:mod:`kinds`), its pure-PyTorch spec (``spec.py``, gathered in ``fastalign.ops.reference``) and the
registration of each backend (``cpu.py``, ``triton.py``). At call time an op validates its inputs,
picks a backend (:func:`backends` lists them; :func:`backend` or ``FASTALIGN_BACKEND`` forces one)
and runs an autograd-ready implementation. A family lists its public ops in its ``__all__``; they
are re-exported here, so a new op is declared in its family alone.
"""

from . import advantages, kl, logprobs, offpolicy, policy, preference, reference, steering
from .advantages import *  # noqa: F403
from .dispatch import backend, backends, registered_ops
from .kl import *  # noqa: F403
from .logprobs import *  # noqa: F403
from .offpolicy import *  # noqa: F403
from .policy import *  # noqa: F403
from .preference import *  # noqa: F403
from .steering import *  # noqa: F403

FAMILIES = (logprobs, kl, advantages, policy, preference, steering, offpolicy)
__all__ = [name for family in FAMILIES for name in family.__all__] + [
    "backend", "backends", "registered_ops", "reference"]
