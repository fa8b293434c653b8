"""fastalign.ops — the public fused ops, organized by op.

Each op family is a package (``logprobs``, ``kl``, ``advantages``, ``policy``, ``preference``,
``steering``) holding its public functions with their validation, its kinds declared once
(:mod:`kinds`), its pure-PyTorch spec (``spec.py``, gathered in ``fastalign.ops.reference``) and the
registration of each backend (``cpu.py``, ``triton.py``). At call time an op validates its inputs,
picks a backend (:func:`backends` lists them; :func:`backend` or ``FASTALIGN_BACKEND`` forces one)
and runs an autograd-ready implementation.
"""

from . import reference
from .advantages import gae, group_advantages, rloo_advantages, whiten
from .dispatch import backend, backends, registered_ops
from .kl import kl_penalty
from .logprobs import logprobs_from_logits, sequence_logprobs, token_logprobs
from .policy import policy_loss, value_loss
from .preference import bradley_terry_loss, cpo_loss, d2o_loss, dpo_loss, kto_loss, orpo_loss, simpo_loss
from .steering import steer_logits

__all__ = [
    "token_logprobs", "logprobs_from_logits", "sequence_logprobs", "kl_penalty",
    "group_advantages", "rloo_advantages", "gae", "whiten", "policy_loss", "value_loss",
    "dpo_loss", "simpo_loss", "bradley_terry_loss", "d2o_loss", "kto_loss", "orpo_loss", "cpo_loss",
    "steer_logits",
    "backend", "backends", "registered_ops", "reference",
]
