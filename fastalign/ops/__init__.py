"""fastalign.ops — the public fused ops.

Each op validates its inputs (clear errors naming the argument), picks a backend
(:func:`backends` lists them; :func:`backend` or ``FASTALIGN_BACKEND`` forces one) and runs an
autograd-ready implementation. ``fastalign.ops.reference`` holds the pure-PyTorch spec of each.
"""

from . import (
    native,  # noqa: F401  (registers the compiled backends)
    native_rl,  # noqa: F401  (the compiled backends of the RL and preference ops)
    native_steering,  # noqa: F401  (the compiled backend of steer_logits)
    reference,
    triton_logprobs,  # noqa: F401  (registers the triton backend; imports triton only when it runs)
    triton_rl,  # noqa: F401  (triton backend of the RL/preference ops; imports triton only when it runs)
    triton_steering,  # noqa: F401  (triton backend of steer_logits; imports triton only when it runs)
)
from .advantages import gae, group_advantages, rloo_advantages, whiten
from .dispatch import backend, backends, registered_ops
from .kl import kl_penalty
from .logprobs import logprobs_from_logits, sequence_logprobs, token_logprobs
from .policy import policy_loss, value_loss
from .preference import bradley_terry_loss, dpo_loss, simpo_loss
from .steering import steer_logits

__all__ = [
    "token_logprobs", "logprobs_from_logits", "sequence_logprobs", "kl_penalty",
    "group_advantages", "rloo_advantages", "gae", "whiten", "policy_loss", "value_loss",
    "dpo_loss", "simpo_loss", "bradley_terry_loss",
    "steer_logits",
    "backend", "backends", "registered_ops", "reference",
]
