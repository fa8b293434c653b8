"""Functional forms of the fused-linear losses: ``f(hidden, weight, labels, *, ..., **hyperparameters)``.

Each returns ``(loss, metrics)`` like its module in :mod:`fastalign.losses`.
"""

from .d2o import fused_linear_d2o_loss
from .dpo import fused_linear_dpo_loss
from .grpo import fused_linear_grpo_loss
from .kto import fused_linear_kto_loss
from .orpo_cpo import fused_linear_cpo_loss, fused_linear_orpo_loss
from .ppo import fused_linear_ppo_loss
from .simpo import fused_linear_simpo_loss

__all__ = ["fused_linear_dpo_loss", "fused_linear_simpo_loss", "fused_linear_grpo_loss", "fused_linear_ppo_loss",
           "fused_linear_d2o_loss", "fused_linear_kto_loss", "fused_linear_orpo_loss", "fused_linear_cpo_loss"]
