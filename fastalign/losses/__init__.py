"""fastalign.losses — whole alignment losses from hidden states and the LM head, never ``N x V``.

Every loss is called the same way::

    loss, metrics = FusedLinearDPOLoss(beta=0.1)(hidden, lm_head.weight, labels, ref_hidden=ref_hidden)

``hidden [S, T, H]`` (pair losses: the B chosen sequences, then the B rejected; D²O and KTO document theirs), ``weight
[V, H]``, ``labels [S, T]`` already shifted, ``ignore_index`` on prompt and padding; keywords
``bias``, ``ref_hidden``, ``ref_weight`` (default: ``weight``), ``ref_bias``, ``ref_logps``, plus each
loss's own (``advantages``, ``mask``, ``old_logps``, ``num_items`` for GRPO/PPO). ``metrics`` holds
0-d tensors under the names TRL logs. Functional forms live in :mod:`fastalign.losses.functional`.
"""

from .d2o import FusedLinearD2OLoss
from .dpo import FusedLinearDPOLoss
from .functional import (
                         fused_linear_cpo_loss,
                         fused_linear_d2o_loss,
                         fused_linear_dpo_loss,
                         fused_linear_grpo_loss,
                         fused_linear_kto_loss,
                         fused_linear_orpo_loss,
                         fused_linear_ppo_loss,
                         fused_linear_simpo_loss,
)
from .grpo import FusedLinearGRPOLoss
from .kto import FusedLinearKTOLoss
from .orpo_cpo import FusedLinearCPOLoss, FusedLinearORPOLoss
from .ppo import FusedLinearPPOLoss
from .simpo import FusedLinearSimPOLoss

__all__ = [
    "FusedLinearDPOLoss", "FusedLinearSimPOLoss", "FusedLinearGRPOLoss", "FusedLinearPPOLoss",
    "fused_linear_dpo_loss", "fused_linear_simpo_loss", "fused_linear_grpo_loss", "fused_linear_ppo_loss",
    "FusedLinearD2OLoss", "FusedLinearKTOLoss", "FusedLinearORPOLoss", "FusedLinearCPOLoss",
    "fused_linear_d2o_loss", "fused_linear_kto_loss", "fused_linear_orpo_loss", "fused_linear_cpo_loss",
]
