"""Pure-PyTorch reference implementations: the spec every fast backend is tested against.

Each op's spec lives beside it (``fastalign/ops/<op>/spec.py``); this namespace gathers them. They
favour clarity over speed (token_logprobs materializes the full logits here), accumulate in float32
and take already-validated inputs with the same keywords as the public ops.
"""

from ..advantages.spec import gae, group_advantages, rloo_advantages, whiten
from ..kl.spec import kl_penalty
from ..logprobs.spec import logprobs_from_logits, sequence_logprobs, token_logprobs
from ..policy.spec import policy_loss, value_loss
from ..preference.spec import bradley_terry_loss, cpo_loss, d2o_loss, dpo_loss, kto_loss, orpo_loss, simpo_loss
from ..steering.spec import steer_logits

__all__ = [
    "token_logprobs", "logprobs_from_logits", "sequence_logprobs", "kl_penalty",
    "group_advantages", "rloo_advantages", "gae", "whiten", "policy_loss", "value_loss",
    "dpo_loss", "simpo_loss", "bradley_terry_loss", "d2o_loss", "kto_loss", "orpo_loss", "cpo_loss",
    "steer_logits",
]
