"""Fused-linear PPO (policy part): the clipped surrogate with per-token advantages (e.g. from GAE)."""

from __future__ import annotations

from fastalign.ops import validation as v

from .grpo import FusedLinearGRPOLoss, clipped_policy_loss


def _check_token_advantages(advantages, labels):
    v.float_tensor("advantages", advantages)
    if advantages.dim() != 2:
        raise ValueError(f"advantages must be per token, shape {tuple(labels.shape)} (e.g. from fastalign.ops.gae), "
                         f"got {tuple(advantages.shape)}")


class FusedLinearPPOLoss(FusedLinearGRPOLoss):
    """PPO's policy loss over response hidden states ``[B, T, H]`` and the LM head ``[V, H]``.

    The same per-token clipped surrogate as :class:`FusedLinearGRPOLoss`, with ``advantages``
    ``[B, T]`` per token (GAE, then whitened, as TRL's PPO) and, by default, TRL PPO's aggregation:
    the token mean over the batch (``loss_type="bnpo"``). The KL penalty usually lives in the
    rewards for PPO, so ``beta`` defaults to 0; the value loss is :func:`fastalign.ops.value_loss`.
    ``forward`` takes the same arguments as GRPO's and returns ``(loss, metrics)`` with
    ``clip_ratio/*``, ``entropy``, ``approx_kl`` (``0.5·mean((logp − old_logp)²)``, TRL's
    ``policy/approxkl``) and ``kl`` when ``beta > 0``. ``entropies [B, T]`` give the entropy mask
    (``top_entropy_quantile < 1``) without the no-grad pre-pass (see :func:`clipped_policy_loss`).
    """

    default_loss_type = "bnpo"

    def forward(self, hidden, weight, labels, *, advantages, mask=None, old_logps=None, bias=None, ref_hidden=None,
                ref_weight=None, ref_bias=None, ref_logps=None, num_items=None, num_sequences=None, token_weights=None,
                entropies=None):
        _check_token_advantages(advantages, labels)
        return super().forward(hidden, weight, labels, advantages=advantages, mask=mask, old_logps=old_logps,
                               bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
                               ref_logps=ref_logps, num_items=num_items, num_sequences=num_sequences,
                               token_weights=token_weights, entropies=entropies)


def fused_linear_ppo_loss(hidden, weight, labels, *, advantages, mask=None, old_logps=None, bias=None,
                          ref_hidden=None, ref_weight=None, ref_bias=None, ref_logps=None, num_items=None, beta=0.0,
                          kl_kind="k3", epsilon_low=0.2, epsilon_high=None, loss_type="bnpo",
                          max_completion_length=None, temperature=1.0, entropy_coef=0.0, ignore_index=-100,
                          chunk_size=None, mem_budget=None, **options):
    """Functional form of :class:`FusedLinearPPOLoss` (per-token ``advantages [B, T]``; ``options`` as GRPO's)."""
    _check_token_advantages(advantages, labels)
    return clipped_policy_loss(
        hidden, weight, labels, advantages=advantages, mask=mask, old_logps=old_logps, bias=bias,
        ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps, num_items=num_items,
        beta=beta, kl_kind=kl_kind, epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type,
        max_completion_length=max_completion_length, temperature=temperature, entropy_coef=entropy_coef,
        ignore_index=ignore_index, chunk_size=chunk_size, mem_budget=mem_budget, **options)
